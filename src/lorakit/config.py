"""`LoraConfig`: every choice an adapter is made with, validated once, in one place.

The scaling rule of the LoRA paper (§4.1, seeds 001/003) lives here and nowhere else:
``s = alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (rsLoRA). Layers,
merge, combine and export all ask the config (through :meth:`LoraConfig.scaling_for`).

Module paths are matched the way Hugging Face PEFT matches them (names, a regex,
``"all-linear"``, block indices, rank and alpha patterns: :mod:`lorakit.module_names`, the one
rule, re-exported here), so a config written for PEFT targets the same modules here.

``modules_to_save`` names match as PEFT matches them: a path ending in the name, with no
dot boundary (``"classifier"`` also saves DistilBERT's ``pre_classifier``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields

from lorakit.config_values import invocation_tokens, token_indices
from lorakit.errors import LorakitError
from lorakit.inits import INITS
from lorakit.module_names import (  # noqa: F401  (re-exported: a config's names are matched there)
    ALL_LINEAR, as_name_list, block_index, name_matches, narrows_a_regex, parse_layers, parse_modules, parse_parameters,
    parse_targets, pattern_key,
)

BIAS_MODES = ("none", "all", "lora_only")

# PEFT's init_lora_weights value <-> our init name.
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "random": False}
_PEFT_TO_INIT = {True: "kaiming", False: "random", "gaussian": "gaussian", "pissa": "pissa"}
# PEFT's other starts: the file holds their trained factors, which load like any others (PEFT
# loads them the same way, onto the base the user gives); recorded as PEFT's default start.
_PEFT_OTHER_INITS = ("orthogonal", "mica", "eva", "corda", "loftq", "lora_ga")


def _init_from_peft(init):
    if not isinstance(init, (bool, str)):
        return init
    if isinstance(init, str) and init.startswith("pissa_niter_"):  # PiSSA with a fast SVD
        warnings.warn(f"init_lora_weights {init!r} (PiSSA from a randomized SVD) is loaded as 'pissa': the base's "
                      "residual is taken from the exact SVD, which a randomized one only approximates, so outputs "
                      "differ a little from the trained model's; save the adapter converted for the original base "
                      "to load it exactly", stacklevel=4)
        return "pissa"
    if init in _PEFT_OTHER_INITS:
        return "kaiming"
    return _PEFT_TO_INIT.get(init, init)

# PEFT config keys that carry no meaning for a LoRA adapter's maths (bookkeeping) and
# PEFT features lorakit does not implement, with the value that means "feature off".
_PEFT_BOOKKEEPING = {
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "monteclora_config", "arrow_config", "kasa_config", "qalora_group_size", "ensure_weight_tying",
}
_PEFT_UNSUPPORTED_OFF = {"layer_replication": None, "use_qalora": False, "use_bdlora": None}


@dataclass
class LoraConfig:
    """How to build one LoRA adapter.

    Attributes:
        r: rank of ``ΔW = s·B·A``; ``A: (r, in_features)``, ``B: (out_features, r)``.
        alpha: numerator of the scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: probability of zeroing an input feature on the adapter path, in [0, 1).
        target_modules: names, a regex, or ``"all-linear"`` (see the module docstring);
            None lets :func:`lorakit.model.attach` pick the model family's default.
        exclude_modules: names or a regex of paths never to wrap, same matching rules.
        rank_pattern / alpha_pattern: per-path overrides of ``r`` / ``alpha``.
        use_rslora: use ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: a registered init (:data:`lorakit.inits.INITS`): ``"gaussian"`` (the seeds;
            A ~ N(0, std 1/r) as PEFT's ``"gaussian"``), ``"kaiming"`` (PEFT's default),
            ``"pissa"`` (top-r SVD of W, residual frozen), ``"random"`` (B non-zero; tests).
        bias: which biases train: ``"none"``, ``"all"``, or ``"lora_only"`` (of wrapped layers).
        modules_to_save: names of modules (e.g. a classifier head) trained in full as a
            per-adapter copy. On a sequence classifier the head is added to them, as PEFT
            does for task_type SEQ_CLS, unless this is ``[]`` and task_type None
            (:func:`lorakit.peft_format.with_task_heads`).
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``); lorakit
            detects Conv1D itself, this is kept for PEFT's file format.
        use_dora: DoRA (Liu et al. 2024): ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` with a trained
            magnitude ``m`` per output feature (:mod:`lorakit.layers.dora`); for linear,
            Conv1D, embedding and convolution targets.
        target_parameters: names of ``nn.Parameter`` s adapted directly, PEFT's key (e.g.
            ``["experts.gate_up_proj", "experts.down_proj"]`` for fused mixture-of-experts
            weights): a parameter ``<module path>.<name>`` matches when it equals an entry or
            ends in ``"." + entry``. With them ``target_modules`` may be None or ``[]`` (no
            module targets). See :mod:`lorakit.layers.parameter`.
        layers_to_transform: only the blocks of these indices (an int or a list) are adapted,
            PEFT's key: a module named by a list of ``target_modules`` (or ``"all-linear"``,
            or the family's default) is a target only when the first numbered segment of its
            path, ``<name>.<index>.``, holds one of them. Not with a regex ``target_modules``
            (the regex says which blocks), nor for ``target_parameters``, as in PEFT.
        layers_pattern: the name (or names) of the block list whose index counts, e.g.
            ``"layers"`` or ``["h"]``; None: the first numbered segment of the path.
        lora_bias: B has a bias ``b`` too (PEFT's key): ``ΔW x + s·b``, merged into the base
            layer's bias. For dense targets (``nn.Linear``, ``Conv1D``), not with DoRA, and
            started as PEFT allows it (init ``"kaiming"`` or ``"random"``, PEFT's True / False);
            what it is for: an adapter extracted from a full fine-tune keeps the biases' change.
        trainable_token_indices: rows of a token embedding trained whole, per adapter (PEFT's
            key; e.g. new chat tokens): a list of token ids (the input embedding's) or a dict
            of embedding name -> ids. An output head tied to the embedding follows it. See
            :mod:`lorakit.tokens`.
        alora_invocation_tokens: an activated LoRA (PEFT's key): the adapter changes a causal LM
            only from the last occurrence of these token ids in each row on (:mod:`lorakit.alora`);
            dense targets, not with DoRA, lora_bias or target_parameters, never merged, as PEFT.
        base_model_name_or_path, task_type: recorded for PEFT's ``adapter_config.json``.

    Raises:
        LorakitError: from ``__post_init__`` for any value outside its range, naming it.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "gaussian"
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    use_dora: bool = False
    target_parameters: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    alora_invocation_tokens: list[int] | None = None

    def __post_init__(self):
        self.r = _check_rank(self.r, "r")
        self.alpha = _check_alpha(self.alpha, "alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= float(self.dropout) < 1.0:
            raise LorakitError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = as_name_list(self.target_modules, "target_modules")
        self.exclude_modules = as_name_list(self.exclude_modules, "exclude_modules")
        ms = as_name_list(self.modules_to_save, "modules_to_save")
        if isinstance(ms, str):
            ms = [ms]
        self.modules_to_save = ms
        for spec, what in ((self.target_modules, "target_modules"), (self.exclude_modules, "exclude_modules")):
            if isinstance(spec, str) and spec != ALL_LINEAR:
                try:
                    re.compile(spec)
                except re.error as err:
                    raise LorakitError(f"{what} {spec!r} is not a valid regular expression ({err})") from None
        self.rank_pattern = {str(k): _check_rank(v, f"rank_pattern[{k!r}]") for k, v in dict(self.rank_pattern or {}).items()}
        self.alpha_pattern = {str(k): _check_alpha(v, f"alpha_pattern[{k!r}]") for k, v in dict(self.alpha_pattern or {}).items()}
        if self.init not in INITS:
            raise LorakitError(f"init {self.init!r} is unknown; choose one of {sorted(INITS)}")
        if self.bias not in BIAS_MODES:
            raise LorakitError(f"bias {self.bias!r} is unknown; choose one of {list(BIAS_MODES)}")
        self.use_rslora = bool(self.use_rslora)
        self.fan_in_fan_out = bool(self.fan_in_fan_out)
        self.use_dora = bool(self.use_dora)
        params = self.target_parameters
        if params is not None:
            if isinstance(params, str) or not all(isinstance(n, str) and n for n in params):
                raise LorakitError(f"target_parameters must be a list of parameter names such as "
                                   f"['experts.gate_up_proj'], got {params!r}")
            self.target_parameters = sorted(set(params)) if isinstance(params, (set, frozenset)) else list(params)
        if self.target_parameters and self.use_dora:
            raise LorakitError("DoRA does not apply to target_parameters (a parameter has no single output axis, "
                               "as in PEFT); use target_modules for DoRA or set use_dora=False")
        if self.target_parameters and self.dropout:
            raise LorakitError(f"dropout {self.dropout} cannot apply to target_parameters (the module's input is "
                               "not the adapter's to drop out, as in PEFT); set dropout to 0")
        self._check_layers()
        self.lora_bias = bool(self.lora_bias)
        if self.lora_bias and (self.use_dora or self.target_parameters):
            raise LorakitError("lora_bias applies to LoRA on dense layers, not with use_dora or target_parameters "
                               "(as in PEFT); set lora_bias=False")
        if self.lora_bias and self.init not in ("kaiming", "random"):
            raise LorakitError(f"lora_bias starts from init 'kaiming' or 'random' (PEFT's True / False, the only "
                               f"starts PEFT loads with it), not {self.init!r}")
        self.trainable_token_indices = token_indices(self.trainable_token_indices)
        self.alora_invocation_tokens = invocation_tokens(self.alora_invocation_tokens)
        if self.alora_invocation_tokens and (self.use_dora or self.lora_bias or self.target_parameters
                                             or self.task_type not in (None, "CAUSAL_LM")):
            raise LorakitError("alora_invocation_tokens (an activated LoRA) is for a causal LM's dense layers, not "
                               "with use_dora, lora_bias, target_parameters or another task_type (as in PEFT)")

    def _check_layers(self):
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers in ([], ()):
            layers = None  # PEFT: an empty list selects every block
        if isinstance(layers, (list, tuple, set, frozenset)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise LorakitError(f"layers_to_transform must be block indices (integers from 0), got {layers!r}")
            layers = sorted(set(layers))
        elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise LorakitError(f"layers_to_transform must be a block index or a list of them, got {layers!r}")
        if pattern in ("", [], ()):
            pattern = None
        if pattern is not None:
            names = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
                raise LorakitError(f"layers_pattern must be the name of the block list, such as 'layers', "
                                   f"or a list of names, got {pattern!r}")
            pattern = pattern if isinstance(pattern, str) else list(pattern)
            if layers is None:
                raise LorakitError(f"layers_pattern {pattern!r} says where to read a block's index, but "
                                   "layers_to_transform names no blocks; give both, or neither")
        if narrows_a_regex(self.target_modules, layers):
            raise LorakitError(f"layers_to_transform {layers!r} cannot narrow a regex target_modules "
                               f"({self.target_modules!r}): name the blocks in the regex, or give target_modules "
                               "as a list of names")
        self.layers_to_transform, self.layers_pattern = layers, pattern

    # ------------------------------------------------------------------ per-path values

    def rank_for(self, path: str) -> int:
        """Rank of the adapter at module ``path`` (``rank_pattern`` first, then ``r``)."""
        key = pattern_key(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, path: str) -> float:
        """Alpha of the adapter at module ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        key = pattern_key(self.alpha_pattern, path)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, path: str) -> float:
        """``s`` at module ``path``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return scaling(self.alpha_for(path), self.rank_for(path), self.use_rslora)

    def targets(self, path: str) -> bool:
        """True when ``path`` is named by ``target_modules``, lies in ``layers_to_transform``
        and is not named by ``exclude_modules``.

        ``"all-linear"`` and None are resolved by :mod:`lorakit.model`; here they match nothing.
        """
        if self.target_modules in (None, ALL_LINEAR):
            return False
        return name_matches(self.target_modules, path) and self.in_layers(path, self.target_modules) \
            and not self.excludes(path)

    def in_layers(self, path: str, names=None) -> bool:
        """True unless ``layers_to_transform`` leaves module ``path`` out (PEFT's rule).

        The block index is the number in the first ``<name>.<index>.`` of the path (of
        ``<layers_pattern>.<index>.`` when given), so a mixture-of-experts path
        ``model.layers.1.experts.0.w1`` is in block 1. A path with no such index is left out.
        ``names``: the list of target names that selected ``path``; a path named there in full
        is kept whatever its block, as PEFT keeps it.

        >>> LoraConfig(target_modules=["q"], layers_to_transform=[1]).in_layers("model.layers.1.attn.q")
        True
        >>> LoraConfig(target_modules=["q"], layers_to_transform=1, layers_pattern="h").in_layers("h.0.attn.q")
        False
        """
        layers = self.layers_to_transform
        if layers is None or (isinstance(names, list) and path in names):
            return True
        index = block_index(path, self.layers_pattern)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def excludes(self, path: str) -> bool:
        return name_matches(self.exclude_modules, path)

    def saves(self, path: str) -> bool:
        """True when ``modules_to_save`` names ``path``: PEFT's rule, the path ends in a name
        (no dot boundary, so ``"classifier"`` matches ``pre_classifier`` too)."""
        return any(path.endswith(name) for name in self.modules_to_save or ())

    def unsaved_names(self, paths) -> list[str]:
        """Names of ``modules_to_save`` no path of ``paths`` matches (:meth:`saves`); PEFT passes over them
        (its classifiers list ``classifier`` and ``score``), a name the user gives is checked."""
        paths = list(paths)
        return [name for name in self.modules_to_save or ()
                if not any(LoraConfig(modules_to_save=[name]).saves(path) for path in paths)]

    def within_saved(self, path: str) -> bool:
        """True when ``path`` is, or lies inside, a module ``modules_to_save`` names: such a
        module is trained and saved whole, so LoRA never targets it or anything in it (as PEFT,
        which skips those targets; a RoBERTa head's ``classifier.dense`` is one)."""
        if not self.modules_to_save:
            return False
        parts = path.split(".")
        return any(self.saves(".".join(parts[:i])) for i in range(1, len(parts) + 1))

    # ------------------------------------------------------------------ PEFT's format

    def to_peft_dict(self) -> dict:
        """This config as PEFT's ``adapter_config.json`` dict (``peft_type: "LORA"``)."""
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": _INIT_TO_PEFT.get(self.init, self.init),
            "bias": self.bias,
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "use_dora": self.use_dora,
            "target_parameters": self.target_parameters,
            "lora_bias": self.lora_bias,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "trainable_token_indices": self.trainable_token_indices,
            "alora_invocation_tokens": self.alora_invocation_tokens,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` dict.

        Keys lorakit does not know are ignored with a warning (files from newer PEFT load).

        Raises:
            LorakitError: not a LoRA config, a PEFT feature lorakit cannot reproduce
                (trainable_token_indices, layer_replication, ...) switched on, or a bad value.
        """
        if not isinstance(d, dict):
            raise LorakitError(f"an adapter config must be a JSON object, got {type(d).__name__}")
        peft_type = str(d.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise LorakitError(f"peft_type is {d.get('peft_type')!r}; lorakit reads LoRA adapters (peft_type 'LORA', "
                               "and AdaLoRA's files as LoRA) only")
        for key, off in _PEFT_UNSUPPORTED_OFF.items():
            value = d.get(key, off)
            if value not in (off, None, False, [], {}):
                raise LorakitError(f"the adapter config sets {key}={value!r}, a PEFT feature lorakit does not support")
        init = d.get("init_lora_weights", True)
        kw = {
            "r": d.get("r", 8),
            "alpha": d.get("lora_alpha", 8),
            "dropout": d.get("lora_dropout", 0.0) or 0.0,
            "target_modules": d.get("target_modules"),
            "exclude_modules": d.get("exclude_modules"),
            "rank_pattern": d.get("rank_pattern") or {},
            "alpha_pattern": d.get("alpha_pattern") or {},
            "use_rslora": d.get("use_rslora", False),
            "init": _init_from_peft(init),
            "bias": d.get("bias", "none"),
            "modules_to_save": d.get("modules_to_save"),
            "fan_in_fan_out": d.get("fan_in_fan_out", False),
            "base_model_name_or_path": d.get("base_model_name_or_path"),
            "task_type": d.get("task_type"),
            "use_dora": d.get("use_dora") or False,
            "target_parameters": d.get("target_parameters") or None,
            "layers_to_transform": d.get("layers_to_transform"),
            "layers_pattern": d.get("layers_pattern"),
            "lora_bias": d.get("lora_bias") or False,
            "trainable_token_indices": d.get("trainable_token_indices") or None,
            "alora_invocation_tokens": d.get("alora_invocation_tokens"),
        }
        peft_names = (set(kw) - {"alpha", "dropout", "init"}) | {"lora_alpha", "lora_dropout", "init_lora_weights"}
        unknown = sorted(set(d) - peft_names - _PEFT_BOOKKEEPING - set(_PEFT_UNSUPPORTED_OFF))
        if unknown:
            warnings.warn(f"ignoring adapter config keys lorakit does not know: {unknown}", stacklevel=2)
        return cls(**kw)

    def to_dict(self) -> dict:
        """Plain dict of the fields (lorakit's own names)."""
        return asdict(self)

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied, validated again."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return LoraConfig(**kw)


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``alpha / r`` (LoRA §4.1), or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_rank(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LorakitError(f"{what} must be a positive integer, got {value!r}; try 8")
    return int(value)


def _check_alpha(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LorakitError(f"{what} must be a positive number, got {value!r}; a common choice is alpha = r")
    return value
