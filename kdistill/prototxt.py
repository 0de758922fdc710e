"""Load a Caffe ``KnowledgeDistillation`` layer definition as a configured :class:`KDLoss`.

The prototxt is parsed by protobuf's own text-format parser against a descriptor of the subset of
``caffe.proto`` that such a layer can use, built here at import time, so no Caffe install or
generated code is needed and any field outside that subset is reported by name.
"""

from __future__ import annotations

import logging

from google.protobuf import descriptor_pb2, descriptor_pool, text_format

from kdistill.losses import KDLoss

logger = logging.getLogger(__name__)

_NORMALIZATION_NAMES = {
    "FULL": "full",
    "VALID": "valid",
    "BATCH_SIZE": "batch_size",
    "NONE": "none",
}

_F = descriptor_pb2.FieldDescriptorProto


class PrototxtError(ValueError):
    """A prototxt that cannot be turned into a :class:`KDLoss`; the message says why."""


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, fields: list[tuple]) -> None:
    message = file.message_type.add(name=name)
    for field_name, number, kind, label, *type_name in fields:
        field = message.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name[0]


def _build_classes() -> tuple[type, type]:
    """Message classes for ``caffe.LayerParameter`` and a one-field ``caffe.NetParameter``."""
    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(name="kdistill_caffe_subset.proto", package="caffe")
    file.syntax = "proto2"

    phase = file.enum_type.add(name="Phase")
    phase.value.add(name="TRAIN", number=0)
    phase.value.add(name="TEST", number=1)

    _message(
        file,
        "NetStateRule",
        [
            ("phase", 1, _F.TYPE_ENUM, opt, ".caffe.Phase"),
            ("min_level", 2, _F.TYPE_INT32, opt),
            ("max_level", 3, _F.TYPE_INT32, opt),
            ("stage", 4, _F.TYPE_STRING, rep),
            ("not_stage", 5, _F.TYPE_STRING, rep),
        ],
    )
    _message(
        file,
        "LossParameter",
        [
            ("ignore_label", 1, _F.TYPE_INT32, opt),
            ("normalize", 2, _F.TYPE_BOOL, opt),
            ("normalization", 3, _F.TYPE_ENUM, opt, ".caffe.LossParameter.NormalizationMode"),
        ],
    )
    modes = file.message_type[-1].enum_type.add(name="NormalizationMode")
    for number, name in enumerate(_NORMALIZATION_NAMES):
        modes.value.add(name=name, number=number)

    _message(
        file,
        "SoftmaxParameter",
        [
            ("engine", 1, _F.TYPE_ENUM, opt, ".caffe.SoftmaxParameter.Engine"),
            ("axis", 2, _F.TYPE_INT32, opt),
        ],
    )
    engine = file.message_type[-1].enum_type.add(name="Engine")
    for number, name in enumerate(("DEFAULT", "CAFFE", "CUDNN")):
        engine.value.add(name=name, number=number)

    _message(file, "KnowledgeDistillationParameter", [("temperature", 1, _F.TYPE_FLOAT, opt)])
    _message(
        file,
        "LayerParameter",
        [
            ("name", 1, _F.TYPE_STRING, opt),
            ("type", 2, _F.TYPE_STRING, opt),
            ("bottom", 3, _F.TYPE_STRING, rep),
            ("top", 4, _F.TYPE_STRING, rep),
            ("loss_weight", 5, _F.TYPE_FLOAT, rep),
            ("include", 8, _F.TYPE_MESSAGE, rep, ".caffe.NetStateRule"),
            ("exclude", 9, _F.TYPE_MESSAGE, rep, ".caffe.NetStateRule"),
            ("phase", 10, _F.TYPE_ENUM, opt, ".caffe.Phase"),
            ("propagate_down", 11, _F.TYPE_BOOL, rep),
            ("loss_param", 101, _F.TYPE_MESSAGE, opt, ".caffe.LossParameter"),
            ("softmax_param", 125, _F.TYPE_MESSAGE, opt, ".caffe.SoftmaxParameter"),
            (
                "knowledge_distillation_param",
                147,
                _F.TYPE_MESSAGE,
                opt,
                ".caffe.KnowledgeDistillationParameter",
            ),
        ],
    )
    _message(file, "NetParameter", [("layer", 100, _F.TYPE_MESSAGE, rep, ".caffe.LayerParameter")])

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.22
        from google.protobuf.message_factory import MessageFactory

        factory = MessageFactory(pool)
        return (
            factory.GetPrototype(pool.FindMessageTypeByName("caffe.LayerParameter")),
            factory.GetPrototype(pool.FindMessageTypeByName("caffe.NetParameter")),
        )
    return (
        GetMessageClass(pool.FindMessageTypeByName("caffe.LayerParameter")),
        GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter")),
    )


_LayerParameter, _NetParameter = _build_classes()


def _parse_layer(text: str):
    """Parse either a ``layer { ... }`` block (or several) or a bare layer body."""
    net = _NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as net_error:
        layer = _LayerParameter()
        try:
            text_format.Parse(text, layer)
        except text_format.ParseError as layer_error:
            # Report the error of the reading the text most resembles.
            error = net_error if text.lstrip().startswith("layer") else layer_error
            raise PrototxtError(f"cannot parse the prototxt: {error}") from None
        return layer

    if not net.layer:
        # Empty or comment-only text is a layer body with every field at its default.
        return _LayerParameter()
    distillation = [layer for layer in net.layer if layer.type == "KnowledgeDistillation"]
    if len(distillation) != 1:
        types = [layer.type or "<no type>" for layer in net.layer]
        raise PrototxtError(
            f"expected exactly one layer of type 'KnowledgeDistillation', found "
            f"{len(distillation)} among layers of types {types}"
        )
    return distillation[0]


def from_prototxt(text: str) -> KDLoss:
    """Build the :class:`KDLoss` that a Caffe ``KnowledgeDistillation`` layer describes.

    Reads ``knowledge_distillation_param.temperature`` (default 1), ``softmax_param.axis``
    (default 1), ``loss_param.ignore_label``, ``loss_param.normalization`` (default VALID) or the
    legacy ``loss_param.normalize`` (true: VALID, false: BATCH_SIZE) and ``loss_weight``
    (default 1). ``name``, ``bottom``, ``top``, ``include``/``exclude``, ``phase`` and
    ``propagate_down`` are accepted and have no effect on the loss.

    Args:
        text: a ``layer { ... }`` block, a prototxt holding exactly one such layer among others,
            or the body of one.

    Returns:
        The configured loss module.

    Raises:
        PrototxtError: (a ValueError) unparsable text, an unknown field, a layer of another
            type, a non-positive temperature, several loss weights, or an ``ignore_label`` on a
            layer given only two bottoms.

    Example:
        >>> criterion = from_prototxt('''
        ... layer {
        ...   name: "KD"  type: "KnowledgeDistillation"
        ...   bottom: "student_logits"  bottom: "teacher_logits"  top: "KL_div"
        ...   knowledge_distillation_param { temperature: 4 }
        ...   loss_weight: 1
        ... }''')
        >>> criterion.temperature
        4.0
    """
    if not isinstance(text, str):
        raise TypeError(f"from_prototxt expects the prototxt as a str, got {type(text).__name__}")
    layer = _parse_layer(text)

    if layer.type and layer.type != "KnowledgeDistillation":
        raise PrototxtError(f"layer type is {layer.type!r}, expected 'KnowledgeDistillation'")
    if len(layer.loss_weight) > 1:
        raise PrototxtError(
            f"a KnowledgeDistillation layer has one top, so at most one loss_weight; got "
            f"{list(layer.loss_weight)}"
        )

    loss_param = layer.loss_param
    ignore_index = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
    if ignore_index is not None and layer.bottom and len(layer.bottom) != 3:
        raise PrototxtError(
            f"loss_param.ignore_label is {ignore_index} but the layer has {len(layer.bottom)} "
            f"bottoms; the labels must be given as the third bottom"
        )
    if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
        normalization = "valid" if loss_param.normalize else "batch_size"
    elif loss_param.HasField("normalization"):
        mode = loss_param.DESCRIPTOR.fields_by_name["normalization"].enum_type
        normalization = _NORMALIZATION_NAMES[mode.values_by_number[loss_param.normalization].name]
    else:
        normalization = "valid"

    kd_param = layer.knowledge_distillation_param
    temperature = kd_param.temperature if kd_param.HasField("temperature") else 1.0
    axis = layer.softmax_param.axis if layer.softmax_param.HasField("axis") else 1
    loss_weight = layer.loss_weight[0] if layer.loss_weight else 1.0

    try:
        return KDLoss(
            temperature=float(temperature),
            axis=int(axis),
            ignore_index=ignore_index,
            normalization=normalization,
            loss_weight=float(loss_weight),
        )
    except (TypeError, ValueError) as error:
        raise PrototxtError(f"invalid KnowledgeDistillation layer: {error}") from None
