"""Finding a layer inside nested models and the keras-hub task class of a backbone (backbones.py)."""

from __future__ import annotations

import keras

from kft.models import backbones


def test_a_layer_is_found_inside_a_nested_model_and_none_when_absent():
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, keras.layers.Dense(2, name="token_embedding")(inner_in), name="inner")
    outer_in = keras.Input((3,))
    outer = keras.Model(outer_in, keras.layers.Dense(1, name="head")(inner(outer_in)))
    assert backbones.nested_layer(outer, lambda layer: layer.name == "token_embedding").name == "token_embedding"
    assert backbones.nested_layer(outer, lambda layer: layer.name == "missing") is None


def test_the_task_class_is_the_subclass_at_any_depth_built_on_the_backbones_class():
    class Backbone:
        pass

    class Other:
        pass

    class Task:
        pass

    class Family(Task):
        backbone_cls = Other

    class Model(Family):
        backbone_cls = Backbone

    assert backbones.task_class(Backbone(), Task) is Model
    assert backbones.task_class(Other(), Task) is Family
    assert backbones.task_class(object(), Task) is None
