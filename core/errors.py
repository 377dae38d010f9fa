"""The one base of every error a user can act on (a bad path, option, file or state): each stage raises its own
subclass with a message that says what to change. The CLI prints any of them as one line and exits 2; the studio
shows them. No torch here, so commands that need none (predicting with an ONNX file) can catch them all."""


class UserError(Exception):
    """Something the user can fix; str(error) says what."""
