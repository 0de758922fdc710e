"""Reference models from Hinton et al.'s MNIST experiment, and loading the user's own models.

The teacher is a 784-1200-1200-10 ReLU network with dropout (0.2 on the inputs, 0.5 on the
hidden units) and a max-norm constraint on each unit's incoming weights; during training its
inputs are jittered by up to two pixels (:func:`random_shift`). The student is a 784-800-800-10
ReLU network with no regularisation.

A model is named either by a key of :data:`MODELS` or by an import path
``package.module:factory``; :func:`build_model` calls the factory with keyword arguments.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model cannot be built, or a weights file does not fit it."""


class MLP(nn.Module):
    """Fully connected ReLU network for flattened images.

    Args:
        in_features: size of a flattened input (784 for 28x28 images).
        hidden: widths of the hidden layers.
        num_classes: number of output logits.
        input_dropout: dropout probability on the inputs.
        dropout: dropout probability after each hidden layer.
        max_norm: if set, :meth:`apply_constraints` rescales every unit's incoming weight
            vector (a row of each hidden layer's weight) to L2 norm at most ``max_norm``.

    Shape:
        input ``(N, *)`` with ``in_features`` elements after the batch dimension; output
        ``(N, num_classes)`` logits.

    Example:
        >>> model = MLP(hidden=(32,), num_classes=10)
        >>> model(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (800, 800),
        num_classes: int = 10,
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        for name, p in (("input_dropout", input_dropout), ("dropout", dropout)):
            if not 0.0 <= p < 1.0:
                raise ModelError(f"{name} must be in [0, 1), got {p}")
        if max_norm is not None and not max_norm > 0:
            raise ModelError(f"max_norm must be positive or None, got {max_norm}")
        self.max_norm = max_norm
        self.input_dropout = nn.Dropout(input_dropout)
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_dropout(x.flatten(1))
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))
        return self.head(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Clip each hidden unit's incoming weight vector to L2 norm ``max_norm`` (if set)."""
        if self.max_norm is None:
            return
        for layer in self.hidden:
            layer.weight.renorm_(2, 0, self.max_norm)


def hinton_teacher(**kwargs) -> MLP:
    """The paper's teacher: 784-1200-1200-10, dropout 0.2 / 0.5, max-norm 15 (keyword overrides)."""
    options = dict(hidden=(1200, 1200), input_dropout=0.2, dropout=0.5, max_norm=15.0)
    return MLP(**{**options, **kwargs})


def hinton_student(**kwargs) -> MLP:
    """The paper's student: 784-800-800-10 with no regularisation (keyword overrides)."""
    return MLP(**{"hidden": (800, 800), **kwargs})


MODELS: dict[str, Callable[..., nn.Module]] = {
    "hinton-teacher": hinton_teacher,
    "hinton-student": hinton_student,
    "mlp": MLP,
}


def build_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build a model from a name in :data:`MODELS` or an import path ``package.module:factory``.

    Args:
        spec: registry name, or ``"package.module:factory"`` where ``factory(**kwargs)``
            returns an ``nn.Module``.
        kwargs: keyword arguments for the factory.

    Returns:
        The new model (randomly initialised by its factory).

    Raises:
        ModelError: the name is unknown, the import fails, or the factory does not return an
            ``nn.Module``.

    Example:
        >>> build_model("mlp", {"hidden": [16]}).head.out_features
        10
    """
    kwargs = dict(kwargs or {})
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ModelError(f"cannot import model factory {spec!r}: {err}") from err
    elif spec in MODELS:
        factory = MODELS[spec]
    else:
        raise ModelError(
            f"unknown model {spec!r}; use one of {', '.join(MODELS)} or 'package.module:factory'"
        )
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ModelError(f"model {spec!r} rejected its arguments {kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    return model


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, or from a torch file with ``weights_only=True``.

    A kdistill checkpoint (``last.safetensors``) works too: its ``model.`` entries are returned.

    Raises:
        ModelError: the file is missing, damaged, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            from kdistill.safeio import verify_tensors_digest

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            # Files kdistill wrote carry a digest (checkpoints over their JSON state too).
            verify_tensors_digest(state, metadata, metadata.get("state", ""), required=False)
        else:
            metadata = {}
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of a foreign file is the file's fault
        raise ModelError(f"cannot read weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if path.suffix == ".safetensors" and metadata.get("format") == "kdistill-checkpoint-1":
        # A training checkpoint (kdistill.checkpoint.FORMAT): its model.* entries are the weights.
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def load_state(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``model``, or raise one error listing every mismatch.

    Raises:
        ModelError: names ``source`` and the missing, unexpected and wrongly shaped entries.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if shapes:
            parts.append("wrong shapes [" + "; ".join(shapes) + "]")
        raise ModelError(f"{source} does not fit the model: " + ", ".join(parts))
    model.load_state_dict(state)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by a random whole number of pixels in [-max_shift, max_shift].

    Pixels moved in from outside the image are zero. Each image gets its own vertical and
    horizontal shift drawn from ``generator``, so the jitter is reproducible and independent
    of the global random state.

    Args:
        x: images of shape ``(N, C, H, W)``.
        max_shift: largest shift in pixels, 0 returns ``x`` unchanged.
        generator: the random generator for the shifts.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator)
    padded = nn.functional.pad(x, (max_shift,) * 4)
    rows = (torch.arange(h) + max_shift)[None, :] - shifts[0][:, None]  # (N, H)
    cols = (torch.arange(w) + max_shift)[None, :] - shifts[1][:, None]  # (N, W)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
