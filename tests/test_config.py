"""TrainConfig: the seed notebooks' defaults, and a clear error naming the bad field."""

import pytest

from core.config import ConfigError, TrainConfig


def test_config_defaults_follow_the_seeds():
    c = TrainConfig(data="x")
    assert (c.optimizer, c.lr, c.epochs, c.batch_size, c.weight_decay, c.image_size, c.normalization) == \
        ("adam", 1e-3, 10, 32, 0.0, 224, "imagenet")
    assert c.validate() is c


@pytest.mark.parametrize("field,value", [("lr", 0), ("epochs", 0), ("image_size", 0), ("batch_size", 0),
                                         ("dropout", 1.5), ("optimizer", "rmsprop")])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(data="x", **{field: value}).validate()
    assert err.value.field == field
