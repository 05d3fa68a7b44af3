"""Hugging Face models (built from tiny configs, nothing downloaded) through the module walk: transformers >= 5
cannot be traced by torch.fx. GPT-2's Conv1D is a linear layer with an (in, out) weight; tied LM heads."""

import warnings

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.export import load_csr, load_csr_into_, read_csr_metadata, save_csr
from fxsparse.layers import prunable_weight_names

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, TOKENS = 40, 6


def gpt2(tie: bool = True) -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    return transformers.BertModel(
        transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=16,
        )
    )


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=16,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            d_model=16,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            d_kv=8,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def vit() -> nn.Module:
    return transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        )
    )


def inputs_of(name: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    ids = torch.randint(2, VOCAB, (2, TOKENS), generator=generator)
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([TOKENS - 1]), 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 4), generator=generator)
    return out


def output_of(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5, "vit": vit}


def sparsify_quietly(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = fxsparse.sparsify(model, *args, **kwargs)
    return sparse, [str(w.message) for w in caught]


def pool_zeros(model) -> tuple[int, int]:
    """(zeros, numel) over the pooled weights (layer_densities also lists the weights left dense)."""
    dense = fxsparse.pool.dense_layers(model)
    counts = [c for fqn, c in fxsparse.layer_densities(model).items() if fqn not in dense]
    return sum(n - nz for nz, n in counts), sum(n for _, n in counts)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_sparsify_train_fold_flops_and_csr(name, tmp_path):
    model = MODELS[name]().eval()
    inputs = inputs_of(name)
    sparse, messages = sparsify_quietly(model, "st3", 0.9)
    assert any("could not trace" in m and "transformers >= 5" in m for m in messages), messages
    prunable = prunable_weight_names(model)
    tied = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and any(m.weight is e.weight for e in model.modules() if isinstance(e, nn.Embedding))
    }
    pooled = {e.fqn for e in fxsparse.pool.unique_entries(sparse)}
    assert pooled == set(prunable) - {f"{n}.weight" for n in tied}  # every linear/Conv1D, tied heads left dense
    if tied:
        assert any("include_embedding_tied=True" in m for m in messages)

    with torch.no_grad():
        sparse(**inputs)  # the threshold runs as a forward pre-hook
    zeros, total = pool_zeros(sparse)
    assert abs(zeros - 0.9 * total) <= 1  # exact over the pool, to the weight

    # one training step: every pooled weight gets a gradient, the schedule advances, sparsity holds
    sparse.train()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    outputs = sparse(**inputs)
    sum(v.float().pow(2).mean() for v in outputs.values() if isinstance(v, torch.Tensor)).backward()
    gradients = [entry.original.grad for entry in fxsparse.pool.unique_entries(sparse)]
    assert all(g is not None for g in gradients) and sum(g.abs().sum() for g in gradients) > 0
    optimizer.step()
    fxsparse.step_(sparse)
    sparse.eval()

    folded = fxsparse.fold(sparse).eval()
    with torch.no_grad():
        expected = output_of(sparse(**inputs))
        assert torch.equal(output_of(folded(**inputs)), expected)
    zeros, total = pool_zeros(sparse)
    assert abs(zeros - 0.9 * total) <= 1

    report = fxsparse.flops(sparse, inputs)  # keyword inputs, the way HF models are called
    rows = {r.name: r for r in report.weight_rows}
    assert set(prunable) <= set(rows), set(prunable) - set(rows)
    densities = fxsparse.layer_densities(sparse)
    for fqn, (nonzeros, numel) in densities.items():
        assert rows[fqn].density == nonzeros / numel, fqn

    path = tmp_path / f"{name}.safetensors"
    csr = save_csr(sparse, path)
    assert csr.metadata["sparsity"] <= fxsparse.realized_sparsity(sparse)  # tied heads count dense
    state = load_csr(path)
    reference = folded.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    fresh = MODELS[name]().eval()
    load_csr_into_(fresh, path)
    with torch.no_grad():
        assert torch.equal(output_of(fresh(**inputs)), expected)


def test_gpt2_conv1d_is_pooled_counted_and_exported_as_its_out_in_matrix(tmp_path):
    model = gpt2().eval()
    sparse, _ = sparsify_quietly(model, "st3sigma", 0.8)
    pooled = {e.fqn for e in fxsparse.pool.unique_entries(sparse)}
    conv1d = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and set(conv1d) == pooled

    inputs = inputs_of("gpt2")
    row = fxsparse.flops(sparse, inputs).row("transformer.h.0.mlp.c_fc.weight")  # Conv1D(nf=64, nx=16)
    assert row.op == "linear" and row.dense_macs == 2 * TOKENS * 16 * 64

    path = tmp_path / "gpt2.safetensors"
    save_csr(sparse, path)
    entry = read_csr_metadata(path)["tensors"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["shape"] == [16, 64] and entry["layout"] == "csr" and entry["output_axis"] == 1
    from safetensors.torch import load_file

    stored = load_file(str(path))
    weight = fxsparse.fold(sparse).transformer.h[0].mlp.c_fc.weight.detach()
    key = "transformer.h.0.mlp.c_fc.weight::"
    crow, col, values = (
        stored[key + part].long() if part != "values" else stored[key + part]
        for part in ("crow_indices", "col_indices", "values")
    )
    matrix = torch.zeros(64, 16)
    for row in range(64):
        matrix[row, col[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
    assert torch.equal(matrix, weight.T)  # the CSR of the (out, in) matrix


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Conv1D(24, 8), Conv1D(4, 24)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class LinearNet(nn.Module):
    def __init__(self, source: Conv1DNet):
        super().__init__()
        self.a, self.b = nn.Linear(8, 24), nn.Linear(24, 4)
        with torch.no_grad():
            for mine, theirs in ((self.a, source.a), (self.b, source.b)):
                mine.weight.copy_(theirs.weight.T)
                mine.bias.copy_(theirs.bias)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method", ["st3", "st3sigma", "feather", "gmp"])
def test_conv1d_sparsifies_exactly_as_the_linear_layer_it_is(method):
    """ST-3's per-output-channel rescale and ST-3-sigma's shape sum see Conv1D's output dim (dim 1)."""
    conv = Conv1DNet()
    linear = LinearNet(conv)
    sparse_conv = fxsparse.sparsify(conv, method, 0.7)
    sparse_linear = fxsparse.sparsify(linear, method, 0.7)
    x = torch.randn(5, 8)
    torch.testing.assert_close(sparse_conv(x), sparse_linear(x), rtol=0, atol=1e-6)
    for name in ("a", "b"):
        assert torch.equal(getattr(sparse_conv, name).weight, getattr(sparse_linear, name).weight.T), name
    if method == "st3":  # by hand: ST-3's rescale over the rows (output channels) of the (out, in) matrix
        torch.testing.assert_close(
            sparse_conv.a.weight,
            st3_by_hand(conv.a.weight.T, fxsparse.get_threshold(sparse_conv).tau).T,
            rtol=1e-6,
            atol=1e-7,
        )


def st3_by_hand(matrix: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """ST-3 (docs/METHODS.md): soft threshold, each output row c rescaled by 1.01 / (r_c + 0.01)."""
    rows = []
    for row in matrix.detach():
        kept = row.abs() > tau
        ratio = ((row.abs() * kept).mean() + 1e-6) / (row.abs().mean() + 1e-6)
        rows.append(torch.sign(row) * (row.abs() - tau).clamp_min(0) * (1.01 / (ratio + 0.01)))
    return torch.stack(rows)


def test_accelerate_checkpoint_reads_conv1d_weights(tmp_path):
    """Conv1D weights (in, out) are stored as the CSR of their transpose (output_axis 1); building from the
    checkpoint densifies them with that layout (it refused them before: a (shape[0], rest) view has other rows)."""
    model = Conv1DNet()
    with torch.no_grad():
        for layer in (model.a, model.b):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.2)
    file = tmp_path / "conv1d.safetensors"
    save_csr(model, file)
    assert read_csr_metadata(file)["tensors"]["a.weight"]["output_axis"] == 1
    with fxsparse.inference.skeleton():
        plain = Conv1DNet()
    x = torch.randn(3, 8)
    # both layers dense, whatever the timing would choose (the compiled kernels beat dense on these tiny layers
    # on some CPUs): the densified weights are then the model's, bit for bit
    fast = fxsparse.accelerate_checkpoint(file, plain, x, paths={"a": "dense", "b": "dense"})
    assert torch.equal(fast.a.weight, model.a.weight) and torch.equal(fast.b.weight, model.b.weight)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    with fxsparse.inference.skeleton():
        plain = Conv1DNet()
    timed = fxsparse.accelerate_checkpoint(file, plain, x)  # dense or sparse, as timed: the same function
    torch.testing.assert_close(timed(x), model(x), rtol=1e-5, atol=1e-6)


def test_tied_lm_head_default_is_dense_and_fold_computes_what_the_sparse_model_does():
    model = gpt2().eval()
    ids = inputs_of("gpt2")
    with pytest.warns(
        UserWarning,
        match=r"lm_head.weight: tied to the embedding transformer.wte.*"
        r"include_embedding_tied=True",
    ):
        sparse = fxsparse.sparsify(model, "st3", 0.9, trace_model=False)
    assert not torch.nn.utils.parametrize.is_parametrized(sparse.lm_head)
    with torch.no_grad():
        assert torch.equal(fxsparse.fold(sparse)(**ids).logits, sparse(**ids).logits)
    assert fxsparse.flops(sparse, ids).row("lm_head.weight").density == 1.0


def test_include_embedding_tied_sparsifies_both_uses_of_the_weight():
    model = gpt2().eval()
    ids = inputs_of("gpt2")
    sparse = fxsparse.sparsify(model, "st3", 0.9, trace_model=False, include_embedding_tied=True)
    with torch.no_grad():
        sparse(**ids)  # the threshold runs as a forward pre-hook
    head, embedding = sparse.lm_head.weight, sparse.transformer.wte.weight
    assert torch.equal(head, embedding) and (head == 0).float().mean() > 0.5  # one effective weight, sparse
    with torch.no_grad():
        sparse_logits = sparse(**ids).logits
        assert torch.equal(fxsparse.fold(sparse)(**ids).logits, sparse_logits)
    assert fxsparse.get_threshold(sparse).pool_paths[-1] == "lm_head.parametrizations.weight.original"
    untied = fxsparse.sparsify(gpt2(tie=False), "st3", 0.9, trace_model=False)
    assert "lm_head.weight" in {e.fqn for e in fxsparse.pool.unique_entries(untied)}  # an untied head is pooled


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_before_the_ramp_the_walked_model_is_the_original_bitwise(name):
    """The failed torch.fx attempt leaves nothing behind: until the schedule starts, the model is the original."""
    model = MODELS[name]().eval()
    sparse, _ = sparsify_quietly(model, "st3sigma", 0.9, schedule=fxsparse.Cubic(begin=10, end=20))
    inputs = inputs_of(name)
    with torch.no_grad():
        assert torch.equal(output_of(sparse(**inputs)), output_of(model(**inputs)))
