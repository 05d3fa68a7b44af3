"""The attention kernel (csrc/attention_simd.h, inference/attention.py): equal to torch's attention over shapes,
masks, strides and threads; used by a transformers model only for plain calls, and only when it wins end to end."""

import pytest
import torch
import torch.nn.functional as F
from test_end_to_end import prune_
from test_kernels import ISAS  # the instruction sets this CPU runs: an AVX-512 machine tests AVX2's too

import fxsparse
from fxsparse.inference import attention

kernel_needed = pytest.mark.skipif(attention.kernels() is None, reason="needs the compiled kernels on AVX-512 or AVX2")


def assert_close(out, ref, tol=1e-5):
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= tol * max(float(ref.abs().max()), 1e-30)


@pytest.fixture(params=[isa for isa in ISAS if isa != "portable"] or ["none"])
def isa(request):
    """The kernel forced to one instruction set for the test."""
    module = attention.kernels()
    if module is None:
        pytest.skip("needs the compiled kernels on AVX-512 or AVX2")
    module.force_isa(request.param)
    yield request.param
    module.force_isa("auto")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


SHAPES = [  # B, H, Sq, Sk, D: tiles of 6 query rows and 64 keys with every tail, head dims of 1 to 8 registers
    (1, 12, 128, 128, 64),
    (2, 3, 7, 13, 32),
    (1, 2, 1, 37, 128),
    (3, 1, 19, 5, 16),
    (1, 4, 6, 64, 48),
    (2, 2, 11, 200, 80),
]


@kernel_needed
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "per-key", "per-head-and-query"])
def test_the_kernel_equals_torchs_attention(shape, mask, threads, isa):
    b, h, sq, sk, d = shape
    generator = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(b, h, s, d, generator=generator) for s in (sq, sk, sk))
    masks = {"none": None, "per-key": torch.randn(b, 1, 1, sk), "per-head-and-query": torch.randn(1, h, sq, sk)}
    out = attention.kernels().attention(q, k, v, masks[mask], 0.3)
    assert_close(out, attention.reference_attention(q, k, v, masks[mask], 0.3))


@kernel_needed
def test_strided_heads_masked_keys_and_rows_masked_everywhere(threads, isa):
    tokens = torch.randn(2, 9, 4 * 32)  # a transformer's (B, S, H D) projection viewed as heads, not copied
    q = tokens.view(2, 9, 4, 32).transpose(1, 2)
    mask = torch.zeros(2, 1, 9, 9)
    mask[0, :, :, 5:] = float("-inf")  # padding keys
    mask[1, :, 3, :] = float("-inf")  # a query that may attend to nothing: zeros, as torch gives
    out = attention.kernels().attention(q, q, q, mask, 0.125)
    assert_close(out, attention.reference_attention(q, q, q, mask, 0.125))
    assert torch.equal(out[1, 3], torch.zeros(4, 32))
    nan = q.clone()
    nan[0, 0, 0, 0] = float("nan")  # NaN propagates as in torch
    assert out.isnan().sum() == 0 and attention.kernels().attention(nan, q, q, None, 1.0)[0, :, 0].isnan().any()


@kernel_needed
def test_empty_inputs_and_bad_shapes(isa):
    kernels = attention.kernels()
    assert kernels.attention(*(torch.randn(0, 2, 3, 16) for _ in range(3)), None, 1.0).shape == (0, 3, 2, 16)
    q = torch.randn(1, 2, 3, 16)
    assert torch.equal(kernels.attention(q, q[:, :, :0], q[:, :, :0], None, 1.0), torch.zeros(1, 3, 2, 16))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.attention(*(torch.randn(1, 2, 3, 20) for _ in range(3)), None, 1.0)
    with pytest.raises(RuntimeError, match="k and v"):
        kernels.attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16), None, 1.0)


def test_the_op_has_a_reference_path_and_a_fake_kernel():
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    mask = torch.randn(2, 1, 5, 5)
    assert_close(
        torch.ops.fxsparse.native_attention(q, k, v, mask, 0.5), attention.reference_attention(q, k, v, mask, 0.5)
    )
    torch.library.opcheck(torch.ops.fxsparse.native_attention.default, (q, k, v, mask, 0.5))
    odd = [torch.randn(1, 2, 3, 10) for _ in range(3)]  # a head dimension the kernel does not take: torch's path
    assert_close(torch.ops.fxsparse.native_attention(*odd, None, 1.0), attention.reference_attention(*odd, None, 1.0))
    keep = torch.rand(2, 1, 5, 5) > 0.3  # a boolean mask: torch's path too
    keep[..., 0] = True
    out = torch.ops.fxsparse.native_attention(q, k, v, keep, 0.5)
    assert_close(out, attention.reference_attention(q, k, v, keep, 0.5))


# --- transformers ---------------------------------------------------------------------------------------------
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    model = prune_(transformers.BertModel(config, add_pooling_layer=False).eval())
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 11, dtype=torch.long)
    padding[1, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": padding}


def attention_timer(fastest: str):
    """Sparse beats dense end to end; between the attention implementations, ``fastest`` wins."""

    def timer(candidates):
        order = {"sparse": 1.0, "dense": 2.0, fastest: 1.0}
        return {name: order.get(name, 3.0) for name in candidates}

    return timer


def sparse_wins(candidates):  # a per-layer timer: every layer's sparse path beats dense
    return {name: 2.0 if name == "dense" else 1.0 for name in candidates}


def hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@kernel_needed
@pytest.mark.filterwarnings("ignore::UserWarning")  # transformers >= 5 cannot be traced by torch.fx
def test_a_transformer_runs_its_attention_on_the_kernel_when_it_wins(monkeypatch):
    model, inputs = tiny_bert()
    fast = fxsparse.accelerate(model, inputs, timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    record = fast.fxsparse_plan.attention
    assert record["chosen"] and set(record["ms"]) == {attention.TORCH, attention.NATIVE}
    assert fast.config._attn_implementation == attention.IMPLEMENTATION
    assert model.config._attn_implementation == "sdpa"  # the user's model is left as it was
    assert "attention, whole model" in fast.fxsparse_plan.table()
    calls = []
    original = attention.kernels()

    class Counting:  # the kernel module, counting attention calls
        def __getattr__(self, name):
            return getattr(original, name)

        def attention(self, *args):
            calls.append(args[0].shape)
            return original.attention(*args)

    monkeypatch.setattr(attention, "kernels", lambda: Counting())
    assert_close(hidden(fast, inputs), hidden(model, inputs))  # padded keys masked as torch masks them
    assert calls == [(2, 4, 11, 16)] * 2
    plan = fxsparse.inference.AccelerationPlan.from_dict(fast.fxsparse_plan.to_dict())
    assert plan.attention == record
    again = fxsparse.accelerate(model, inputs, paths=plan)  # a given plan: the same choice, not timed
    assert again.config._attn_implementation == attention.IMPLEMENTATION
    assert "not timed" in again.fxsparse_plan.attention["reason"]


@kernel_needed
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_transformer_keeps_torchs_attention_when_the_kernel_does_not_win():
    model, inputs = tiny_bert()
    fast = fxsparse.accelerate(model, inputs, timer=sparse_wins, model_timer=attention_timer(attention.TORCH))
    assert not fast.fxsparse_plan.attention["chosen"] and fast.config._attn_implementation == "sdpa"
    assert_close(hidden(fast, inputs), hidden(model, inputs))


@pytest.mark.parametrize(
    "case", ["causal", "dropout in training", "grouped key/value heads", "position bias", "float64", "autograd"]
)
def test_calls_the_kernel_does_not_compute_run_torchs_attention(case, monkeypatch):
    pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(attention, "native_attention", lambda *args: pytest.fail("the kernel was called"))
    module = torch.nn.Module()
    module.is_causal = case == "causal"
    module.training = case == "dropout in training"
    module.num_key_value_groups = 2 if case == "grouped key/value heads" else 1
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=dtype, requires_grad=case == "autograd") for _ in range(3))
    dropout = 0.5 if case == "dropout in training" else 0.0
    kwargs = {"position_bias": torch.randn(1, 2, 5, 5)} if case == "position bias" else {}  # T5's: a tensor
    torch.manual_seed(0)
    out, _ = attention.transformers_attention(module, q, k, v, None, dropout=dropout, **kwargs)
    torch.manual_seed(0)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, **kwargs)
    assert torch.equal(out, expected)
    if case == "autograd":
        out.sum().backward()
        assert q.grad is not None


def test_a_softcap_reaches_transformers_sdpa(monkeypatch):
    pytest.importorskip("transformers")
    import transformers.integrations.sdpa_attention as sdpa

    monkeypatch.setattr(attention, "native_attention", lambda *args: pytest.fail("the kernel was called"))
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *args, **kwargs: ("sdpa", kwargs["softcap"]))
    q = torch.randn(1, 2, 5, 16)
    assert attention.transformers_attention(torch.nn.Module(), q, q, q, None, softcap=30.0) == ("sdpa", 30.0)


def test_a_model_without_transformers_attention_is_not_switched():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert attention.switch_attention_(model, torch.randn(2, 8), None, 1.0, lambda m, x: m(x)) is None


# --- torch.fx graphs: timm's ViT (attention in a leaf module) and a direct call --------------------------------
def count_kernel_calls(monkeypatch) -> list:
    calls = []
    original = attention._kernel_attention

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(attention, "_kernel_attention", counting)
    return calls


def tiny_vit():
    timm = pytest.importorskip("timm")
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    return prune_(model.eval()), torch.randn(2, 3, 32, 32)


@kernel_needed
def test_a_vits_attention_runs_on_the_kernel_when_it_wins(monkeypatch):
    model, x = tiny_vit()
    fast = fxsparse.accelerate(model, x, timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    assert fast.fxsparse_plan.attention["chosen"]
    wrapped = [m for m in fast.modules() if isinstance(m, attention.AttentionOnKernel)]
    assert len(wrapped) == 2 and not model.blocks[0].attn.training  # the user's model is left as it was
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        assert_close(fast(x), model(x))
        assert calls == [(2, 4, 17, 16)] * 2
    plan = fxsparse.inference.AccelerationPlan.from_dict(fast.fxsparse_plan.to_dict())
    again = fxsparse.accelerate(model, x, paths=plan)
    assert any(isinstance(m, attention.AttentionOnKernel) for m in again.modules())
    with torch.no_grad():
        assert_close(again(x), model(x))
        assert len(calls) == 4
    assert not fast.blocks[0].attn.original.training  # the module itself runs, eval-mode
    assert sorted(fast.state_dict()) == sorted(again.state_dict())


@kernel_needed
def test_a_vit_keeps_torchs_attention_when_the_kernel_does_not_win(monkeypatch):
    model, x = tiny_vit()
    fast = fxsparse.accelerate(model, x, timer=sparse_wins, model_timer=attention_timer(attention.TORCH))
    assert not fast.fxsparse_plan.attention["chosen"]
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    assert calls == []


class DirectAttention(torch.nn.Module):
    """F.scaled_dot_product_attention called in the traced graph itself (the ReLU fused into the output layer
    makes the accelerated model a graph), a bool mask, heads of 32."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(64, 192), torch.nn.Linear(64, 64)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return torch.relu(self.out(attended.transpose(1, 2).reshape(x.shape)))


@kernel_needed
def test_an_attention_call_in_the_traced_graph_runs_on_the_kernel(monkeypatch):
    model, x = prune_(DirectAttention()), torch.randn(3, 10, 64)
    mask = torch.rand(3, 1, 10, 10) > 0.3
    mask[..., 0] = True
    fast = fxsparse.accelerate(model, (x, mask), timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    assert isinstance(fast, torch.fx.GraphModule)
    assert any(isinstance(m, attention.ScaledDotProductAttention) for m in fast.children())
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        assert_close(fast(x, mask), model(x, mask))
    assert calls == [(3, 2, 10, 32)]


@kernel_needed
def test_compiled_and_exported_models_run_torchs_attention_in_their_graphs():
    model, x = tiny_vit()
    fast = fxsparse.accelerate(model, x, timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    with torch.no_grad():
        assert_close(torch.compile(fast, backend="aot_eager", fullgraph=True)(x), model(x))
    assert_close(torch.export.export(fast, (x,)).module()(x), model(x))


class ReadsItsAttention(torch.nn.Module):
    """A parent that reads an attribute of its attention module (as Swin's blocks read their window size)."""

    def __init__(self):
        super().__init__()
        self.attend = DirectAttention()
        self.attend.heads = 2

    def forward(self, x, mask):
        return self.attend(x, mask) * self.attend.heads


@kernel_needed
def test_a_wrapped_attention_module_keeps_its_attributes(monkeypatch):
    model, x = prune_(ReadsItsAttention()), torch.randn(2, 6, 64)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    fast = fxsparse.accelerate(model, (x, mask), timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    assert isinstance(fast.attend, attention.AttentionOnKernel) and fast.attend.heads == 2
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        assert_close(fast(x, mask), model(x, mask))
    assert len(calls) == 1


# --- a zoo of attention models, the kernel forced on (slow) ---------------------------------------------------
ZOO = [
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "eva02_tiny_patch14_224",
    "twins_svt_small",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "maxvit_tiny_tf_224",
    "levit_128s",
]


@kernel_needed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ZOO)
def test_timm_attention_models_accelerate_with_the_kernel_on(name):
    timm = pytest.importorskip("timm")
    model, x = prune_(timm.create_model(name).eval()), torch.randn(2, 3, 224, 224)
    fast = fxsparse.accelerate(model, x, timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    with torch.no_grad():
        assert_close(fast(x), model(x))


def hf_model(name: str):
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    builds = {
        "distilbert": lambda: transformers.DistilBertModel(
            transformers.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
        ),
        "roberta": lambda: transformers.RobertaModel(
            transformers.RobertaConfig(vocab_size=100, hidden_size=64, **small)
        ),
        "llama with grouped key/value heads": lambda: transformers.LlamaModel(
            transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_key_value_heads=2, **small)
        ),
        "t5 encoder (position bias)": lambda: transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        ),
        "gpt2": lambda: transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4)),
    }
    return builds[name]().eval()


@kernel_needed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "name", ["distilbert", "roberta", "llama with grouped key/value heads", "t5 encoder (position bias)", "gpt2"]
)
def test_transformers_attention_models_accelerate_with_the_kernel_on(name):
    model = prune_(hf_model(name))
    inputs = {"input_ids": torch.randint(0, 100, (2, 13)), "attention_mask": torch.ones(2, 13, dtype=torch.long)}
    inputs["attention_mask"][1, 9:] = 0
    fast = fxsparse.accelerate(model, inputs, timer=sparse_wins, model_timer=attention_timer(attention.NATIVE))
    assert_close(hidden(fast, inputs), hidden(model, inputs))
