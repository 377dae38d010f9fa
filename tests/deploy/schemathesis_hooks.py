"""Teaches schemathesis what an image is (its documented custom media types): the schema says /predict takes image
files, which "format: binary" alone cannot say, so without this every schema-valid request is random bytes that the
server rightly refuses as "not an image". Negative cases still send whatever schemathesis makes up."""
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def _png(draw) -> bytes:
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]))
    buf = io.BytesIO()
    Image.new(mode, size, draw(st.integers(0, 255))).save(buf, format="PNG")
    return buf.getvalue()


schemathesis.openapi.media_type("image/png", _png())
