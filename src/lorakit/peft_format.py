"""PEFT's adapter format, the one place that knows it: keys, shapes, task_type, saved heads
(matching a file's tensors to a model before loading them is :mod:`lorakit.peft_load`).

Keys as PEFT 0.21 writes them (the adapter name never appears), built and read only
by :func:`factor_key`, :func:`parse_factor_key`, :func:`bias_key`, :func:`parse_bias_key`,
:func:`magnitude_key`, :func:`parse_magnitude_key`, :func:`token_key`, :func:`parse_token_key`,
:func:`parameter_key_path`, :func:`module_key`, :func:`wrapped_key`, :func:`parameter_name`::

    base_model.model.<path>.lora_A.weight          (r, in_features)      nn.Linear, Conv1D
    base_model.model.<path>.lora_B.weight          (out_features, r)
    base_model.model.<path>.lora_A.weight          (r, in, *kernel)      nn.Conv1d/2d/3d
    base_model.model.<path>.lora_B.weight          (out, r, 1, …)
    base_model.model.<path>.lora_embedding_A       (r, num_embeddings)   nn.Embedding
    base_model.model.<path>.lora_embedding_B       (embedding_dim, r)
    base_model.model.<path>.lora_B.bias            (out_features,)       lora_bias: B's bias (× scaling)
    base_model.model.<path>.lora_magnitude_vector  (out,)                DoRA; (1, out, 1, …) for a conv
    base_model.model.<module>[.base_layer…].lora_A.weight  (E·r, in)     target_parameters
    base_model.model.<module>[.base_layer…].lora_B.weight  (out, E·r)
    base_model.model.<saved path>.<param>          modules_to_save, full (e.g. classifier.weight)
    base_model.model.<path>.token_adapter.trainable_tokens_delta  (n, dim)  trainable_token_indices:
                                                   the n tokens' rows, whole (a tied head saves none)
    base_model.model.<path>.base_layer.bias        bias="lora_only"/"all", of a LoRA layer
    base_model.model.<path>.bias                   bias="all", elsewhere
    base_model.model.<path>.base_layer.weight      the full embedding, when one is targeted

A module with several adapted parameters gets one ``.base_layer`` per parameter after
it in the module's parameter order (PEFT nests one wrapper per parameter, the first
innermost): :func:`parameter_key_path`. :func:`layer_tensors` writes one layer of any
kind in these keys and shapes; :func:`file_shapes` says what a file must hold.

``task_type`` picks PEFT's model class; with ``SEQ_CLS`` PEFT adds the heads named
``classifier`` / ``score`` to ``modules_to_save`` and then requires their weights, so
lorakit does the same when an adapter is attached (:func:`with_task_heads`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.targets import (
    BARE, CAUSAL_LM, CLASSIFIER, CLASSIFIER_HEADS, LoraLayer, is_conv, linear_features, model_kind, parameter_hosts,
    walk,
)

PREFIX = "base_model.model."
FACTOR_SUFFIXES = {  # key suffix -> (factor, embedding?)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}
SEQ_CLS = "SEQ_CLS"
#: PEFT task_type -> the heads PEFT adds to modules_to_save for it (and then needs in every file)
TASK_HEADS = {SEQ_CLS: CLASSIFIER_HEADS, "TOKEN_CLS": CLASSIFIER_HEADS, "QUESTION_ANS": ("qa_outputs",)}
#: model kind (lorakit.targets) -> PEFT task_type, so PEFT picks its matching PeftModel class
TASK_TYPES = {CLASSIFIER: SEQ_CLS, CAUSAL_LM: "CAUSAL_LM", BARE: "FEATURE_EXTRACTION"}
#: transformers class-name ending -> PEFT task_type, for the kinds lorakit calls "other"
_TASK_TYPE_ENDINGS = {"ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
BIAS_SUFFIX = ".lora_B.bias"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


# ---------------------------------------------------------------------- keys


def factor_key(path: str, factor: str, embedding: bool = False) -> str:
    """PEFT's key of factor ``"A"`` or ``"B"`` of the adapter at module ``path``."""
    return f"{PREFIX}{path}.lora_embedding_{factor}" if embedding else f"{PREFIX}{path}.lora_{factor}.weight"


def parse_factor_key(key: str):
    """``(module path, "A" | "B", is_embedding)`` for a LoRA factor key, else None."""
    if not key.startswith(PREFIX):
        return None
    for suffix, (factor, embedding) in FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], factor, embedding
    return None


def _path_of(key: str, suffix: str) -> str | None:
    """The module path of a key ``PREFIX + <path> + suffix``, else None."""
    if key.startswith(PREFIX) and key.endswith(suffix):
        return key[len(PREFIX):-len(suffix)]
    return None


def bias_key(path: str) -> str:
    """PEFT's key of the bias on B (``lora_bias``) of the adapter at module ``path``."""
    return f"{PREFIX}{path}{BIAS_SUFFIX}"


def parse_bias_key(key: str) -> str | None:
    """The module path of a ``lora_B.bias`` key, else None."""
    return _path_of(key, BIAS_SUFFIX)


def magnitude_key(path: str) -> str:
    """PEFT's key of DoRA's magnitude vector of the adapter at module ``path``."""
    return f"{PREFIX}{path}{MAGNITUDE_SUFFIX}"


def parse_magnitude_key(key: str) -> str | None:
    """The module path of a DoRA magnitude key, else None."""
    return _path_of(key, MAGNITUDE_SUFFIX)


def token_key(path: str) -> str:
    """PEFT's key of the trainable token rows (``trainable_token_indices``) of the embedding at ``path``."""
    return f"{PREFIX}{path}{TOKENS_SUFFIX}"


def parse_token_key(key: str) -> str | None:
    """The embedding path of a ``trainable_tokens_delta`` key, else None."""
    return _path_of(key, TOKENS_SUFFIX)


def parameter_key_path(module_path: str, later: int) -> str:
    """The path PEFT's keys give LoRA on a parameter of the module at ``module_path`` when
    ``later`` adapted parameters of that module follow it in the module's parameter order."""
    return module_path + ".base_layer" * later


def parameter_host(key_path: str) -> str:
    """The module path a LoRA-on-parameter key path names (:func:`parameter_key_path` undone)."""
    while key_path.endswith(".base_layer"):
        key_path = key_path[: -len(".base_layer")]
    return key_path


def nested_key_paths(targets: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``{(module path, parameter): key path}`` for parameter targets listed in module order and,
    within a module, in parameter order (as :func:`lorakit.targets.parameter_targets` gives them)."""
    per_module: dict[str, list[str]] = {}
    for module_path, pname in targets:
        per_module.setdefault(module_path, []).append(pname)
    return {(m, p): parameter_key_path(m, len(names) - 1 - i)
            for m, names in per_module.items() for i, p in enumerate(names)}


def key_paths(model: nn.Module, name: str) -> dict[str, str]:
    """``{layer path: key path}`` for adapter ``name``'s LoRA on parameters (layer paths as
    :func:`lorakit.targets.lora_layers` gives them); module layers are keyed by their own path."""
    targets = [(path, pname) for path, host in parameter_hosts(model)
               for pname, layer in host.lora_parameters.items() if name in layer.adapters]
    return {f"{m}.{p}": key for (m, p), key in nested_key_paths(targets).items()}


def file_shapes(module: nn.Module, rank: int) -> tuple[tuple, tuple, tuple]:
    """``(A, B, magnitude)`` shapes a PEFT file holds for an adapter of ``rank`` (rows of A) on
    ``module`` (a base module or a LoRA layer): a convolution's factors are kernels."""
    base = module._base if isinstance(module, LoraLayer) and module.in_place_of_module else module
    if is_conv(base):
        out, channels, *kernel = base.weight.shape
        ones = (1,) * len(kernel)
        return (rank, channels, *kernel), (out, rank, *ones), (1, out, *ones)
    in_f, out_f, _ = factor_dims(module)
    return (rank, in_f), (out_f, rank), (out_f,)


def factor_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, is_embedding)`` of the adapter ``layer`` would hold (a
    convolution's ``in`` is ``in_channels·∏kernel``)."""
    if isinstance(layer, LoraLayer):
        return layer.in_features, layer.out_features, layer.is_embedding
    if isinstance(layer, nn.Embedding):
        num, dim = layer.weight.shape
        return num, dim, True
    if is_conv(layer):
        return layer.weight[0].numel(), layer.weight.shape[0], False
    return (*linear_features(layer), False)


def layer_tensors(key_path: str, layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` of ``layer`` under PEFT's keys at ``key_path``, in the file's shapes
    (nothing when the layer kept no direction, as an AdaLoRA layer may)."""
    A, B = layer.export_factors(name)
    if not A.shape[0]:
        return {}
    a_shape, b_shape, m_shape = file_shapes(layer, A.shape[0])
    out = {factor_key(key_path, "A", layer.is_embedding): A.reshape(a_shape),
           factor_key(key_path, "B", layer.is_embedding): B.reshape(b_shape)}
    magnitude = layer.export_magnitude(name)
    if magnitude is not None:
        out[magnitude_key(key_path)] = magnitude.reshape(m_shape)
    bias = layer.export_bias(name)
    if bias is not None:
        out[bias_key(key_path)] = bias
    return out


def module_key(name: str) -> str:
    """PEFT's key of the model tensor ``name`` saved whole (``classifier.weight``, a bias)."""
    return PREFIX + name


def wrapped_key(path: str, param: str) -> str:
    """PEFT's key of parameter ``param`` (``"bias"``) of the LoRA-wrapped module at ``path``:
    PEFT keeps the original module as ``base_layer``."""
    return f"{PREFIX}{path}.base_layer.{param}"


def parameter_name(key: str) -> str | None:
    """The model's own parameter name a whole-tensor key stands for (the inverse of
    :func:`module_key` and :func:`wrapped_key`), or None when ``key`` lacks the prefix."""
    if not key.startswith(PREFIX):
        return None
    return key[len(PREFIX):].replace(".base_layer.", ".")


def factor_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{module path: (A: (r, in), B: (out, r))}`` of dense layers -> tensors under PEFT's keys."""
    out = {}
    for path, (A, B) in factors.items():
        out[factor_key(path, "A")] = A.contiguous()
        out[factor_key(path, "B")] = B.contiguous()
    return out


def module_tensors(path: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the module at ``path`` (modules_to_save) under PEFT's keys."""
    return {module_key(f"{path}.{name}"): tensor for name, tensor in state.items()}


# ---------------------------------------------------------------------- PEFT's AdaLoRA files

ADALORA = "ADALORA"
#: what only the training schedule of PEFT's AdaLoRA reads: nothing a loaded adapter computes with
_ADALORA_SCHEDULE = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                     "total_step")
_ADALORA_SUFFIXES = {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}


def is_adalora(raw: dict) -> bool:
    """Whether an ``adapter_config.json`` dict is PEFT's AdaLoRA (``peft_type: "ADALORA"``)."""
    return isinstance(raw, dict) and str(raw.get("peft_type", "")).upper() == ADALORA


def adalora_as_lora(raw: dict, tensors: dict[str, torch.Tensor], source=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A file of PEFT's AdaLoRA as the LoRA file whose update is the same: ``(config dict, tensors)``.

    PEFT writes each module's update P·diag(λ)·Q as ``<path>.lora_B`` (P, ``(out, k)``), ``<path>.lora_E``
    (λ, ``(k, 1)``) and ``<path>.lora_A`` (Q, ``(k, in)``), cut to the k directions its allocator kept, and
    scales it by ``lora_alpha / (init_r + 1e-5)`` whatever k is (``lora_alpha`` ≤ 0 meaning ``init_r``).
    As LoRA: ``A = diag(λ)·Q``, ``B = P``, k in ``rank_pattern`` and ``alpha = scaling·k`` in
    ``alpha_pattern`` (the scaling unchanged); modules left with no direction drop out of
    ``target_modules``. Other keys (``modules_to_save`` heads, biases) are kept as they are.

    Raises:
        LorakitError: a module lacks one of its three tensors, their shapes disagree, or no module kept a direction.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _ADALORA_SUFFIXES if key.startswith(PREFIX) and key.endswith(s)), None)
        if suffix is None:
            rest[key] = tensor
        else:
            parts.setdefault(key[len(PREFIX):-len(suffix)], {})[_ADALORA_SUFFIXES[suffix]] = tensor
    init_r = int(raw.get("init_r", raw.get("r", 8)))
    alpha = raw.get("lora_alpha", 8)
    scaling = (alpha if alpha > 0 else float(init_r)) / (init_r + 1e-5)
    ranks, alphas = {}, {}
    for path, factors in parts.items():
        A, B, E = (factors.get(f) for f in "ABE")
        if A is None or B is None or E is None:
            raise LorakitError(f"AdaLoRA adapter {source}: module {path} lacks "
                               f"{', '.join('lora_' + f for f in 'ABE' if factors.get(f) is None)}; save it again")
        k = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != k or E.shape not in ((k, 1), (k,)):
            raise LorakitError(f"AdaLoRA adapter {source}: module {path} has lora_A {tuple(A.shape)}, lora_E "
                               f"{tuple(E.shape)}, lora_B {tuple(B.shape)}, which are not one update's P, λ and Q")
        if k == 0:
            continue
        rest[factor_key(path, "A")] = A * E.reshape(k, 1).to(A.dtype)
        rest[factor_key(path, "B")] = B
        ranks[path], alphas[path] = k, scaling * k
    if not ranks:
        raise LorakitError(f"AdaLoRA adapter {source} kept no direction in any module: it changes nothing")
    lora = {key: value for key, value in raw.items() if key not in _ADALORA_SCHEDULE}
    lora.update(peft_type="LORA", r=max(ranks.values()), lora_alpha=scaling * max(ranks.values()),
                target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas, use_rslora=False,
                use_dora=False, init_lora_weights=True)
    return lora, rest


# ---------------------------------------------------------------------- task_type and saved heads


def base_model_name(model: nn.Module) -> str | None:
    """What PEFT records as ``base_model_name_or_path``: the model's ``config._name_or_path``, or None."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def task_type_for(model: nn.Module) -> str | None:
    """The PEFT ``task_type`` of ``model``'s kind (``SEQ_CLS`` for a sequence classifier,
    ``CAUSAL_LM``, ``FEATURE_EXTRACTION`` for a bare encoder), else by its class name, else None."""
    task_type = TASK_TYPES.get(model_kind(model))
    if task_type is None:
        name = type(model).__name__
        task_type = next((t for end, t in _TASK_TYPE_ENDINGS.items() if name.endswith(end)), None)
    return task_type


#: the PEFT task_types lorakit's commands and server run: a sequence classifier's, a causal LM's
#: (and none: an adapter on a bare model, run as its --model loads)
RUNNABLE_TASK_TYPES = (SEQ_CLS, "CAUSAL_LM", None)


def check_runnable(task_type: str | None, where) -> None:
    """Refuse an adapter whose PEFT ``task_type`` is for a model lorakit's eval, predict, generate
    and serve do not run (a sequence-to-sequence LM, a token classifier, question answering,
    feature extraction), in one line naming it; lorakit.load_adapter still loads it in Python."""
    if task_type not in RUNNABLE_TASK_TYPES:
        raise LorakitError(f"{where} is a PEFT adapter of task_type {task_type!r}; lorakit's eval, predict, "
                           "generate and serve run sequence classifiers (SEQ_CLS) and causal language models "
                           "(CAUSAL_LM): load it in Python with lorakit.load_adapter onto its own model")


def task_heads(model: nn.Module, task_type: str | None, modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Those of the heads PEFT saves with ``task_type`` (:data:`TASK_HEADS`: the classifier with
    ``SEQ_CLS`` and ``TOKEN_CLS``, ``qa_outputs`` with ``QUESTION_ANS``) that ``model`` has: the
    names that end some module path (PEFT's modules_to_save rule)."""
    names = TASK_HEADS.get(task_type, ())
    if not names:
        return []
    paths = [p for p in (walk(model) if modules is None else modules) if p]
    return [name for name in names if any(p.endswith(name) for p in paths)]


def with_task_heads(model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module] | None = None) -> LoraConfig:
    """``config`` as PEFT would attach it to ``model``: ``task_type`` filled in from the model
    (:func:`task_type_for`) when None, and with a task type PEFT saves heads for
    (:data:`TASK_HEADS`: ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``) the task head added to
    ``modules_to_save`` (PEFT does so, and then needs the head's weights in every file),
    with a warning saying so. ``modules_to_save=[]`` (empty, not None) with no task_type on
    such a model keeps the head out: task_type stays None, as PEFT's plain ``PeftModel``
    loads it. ``config`` itself is not changed. ``modules``: a walk of ``model``.

    Raises:
        LorakitError: the head to be saved whole is also a LoRA target.
    """
    changes = {}
    task_type = config.task_type or task_type_for(model)
    if config.task_type is None and task_type in TASK_HEADS and config.modules_to_save == []:
        task_type = None  # the user asked for no head
    if task_type != config.task_type:
        changes["task_type"] = task_type
    if task_type in TASK_HEADS:
        modules = walk(model) if modules is None else modules
        added = [n for n in task_heads(model, task_type, modules) if n not in (config.modules_to_save or [])]
        targeted = [p for p in modules if p and any(p.endswith(n) for n in added) and config.targets(p)]
        if targeted:
            raise LorakitError(f"task_type {task_type} saves the head {targeted[0]} whole (as PEFT does), "
                               "so it cannot be a LoRA target too; leave it out of target_modules")
        if added:
            warnings.warn(f"task_type {task_type}: {added} added to modules_to_save (trained in full and saved with "
                          "the adapter), as PEFT does, so the file loads in PEFT; name them in modules_to_save to "
                          "silence this", stacklevel=4)
            changes["modules_to_save"] = [*(config.modules_to_save or []), *added]
    return config.replace(**changes) if changes else config


def saved_head_outputs(file) -> int | None:
    """The outputs of the sequence-classification head an adapter file (``adapter_model.safetensors``) saves:
    the rows of the smallest 2-D weight under a ``classifier`` or ``score`` module, its output layer (1 for a
    regression, transformers' ``num_labels=1``), read from the safetensors header alone; None where it saves no
    such head, or is no safetensors file that opens (loading it names the problem)."""
    from pathlib import Path

    from safetensors import safe_open

    if not Path(file).is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = [handle.get_slice(key).get_shape() for key in handle.keys()
                      if key.endswith(".weight") and set(key.split(".")) & set(CLASSIFIER_HEADS)]
    except Exception:  # safetensors raises its own error types for a file that is not one
        return None
    rows = [shape[0] for shape in shapes if len(shape) == 2]
    return min(rows) if rows else None
