"""One definition of a prunable weight (fxsparse.layers), read alike by the pass, flops, save_csr and the
training application; ConvTranspose layers, whose output channels are dim 1."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.export import load_csr, read_csr_metadata, save_csr
from fxsparse.layers import MatrixLayout, prunable_weight_names, weight_layout
from fxsparse.pool import unique_entries


class Decoder(nn.Module):
    """Conv -> ConvTranspose (output channels are dim 1 of its weight) -> Linear, and attention."""

    def __init__(self, transpose_groups: int = 1):
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=transpose_groups)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.up(F.relu(self.down(x)))
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


def test_matrix_layout_is_the_matrix_the_op_multiplies_by():
    x = torch.randn(2, 6, 5)
    linear = nn.Linear(6, 4, bias=False)
    matrix = weight_layout(linear).to_matrix(linear.weight)
    tokens = x.transpose(1, 2)
    assert torch.equal(matrix, linear.weight) and torch.allclose(tokens @ matrix.T, linear(tokens), atol=1e-6)

    # a 1x1 transposed conv with groups: output channel o = group * O/g + o' reads inputs of its group only
    up = nn.ConvTranspose1d(6, 4, 1, groups=2, bias=False)
    matrix = weight_layout(up).to_matrix(up.weight)  # (O, I/g) = (4, 3)
    assert matrix.shape == (4, 3)
    by_matrix = torch.cat([matrix[:2] @ x[:, :3], matrix[2:] @ x[:, 3:]], dim=1)
    assert torch.allclose(by_matrix, up(x), atol=1e-6)

    # every layout: to_matrix and flat_index agree entry by entry
    for shape, layout in [
        ((4, 6), MatrixLayout()),
        ((8, 3, 3, 3), MatrixLayout()),
        ((6, 4, 3), MatrixLayout(1, 2)),
        ((6, 4, 2, 2), MatrixLayout(1, 3)),
        ((5, 7), MatrixLayout(1)),
    ]:
        weight = torch.randn(shape)
        matrix = layout.to_matrix(weight)
        rows, cols = layout.matrix_shape(shape)
        assert matrix.shape == (rows, cols)
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        assert torch.equal(weight.flatten()[layout.flat_index(row, col, shape)], matrix), (shape, layout)


def test_every_reader_uses_the_one_definition(tmp_path):
    """The pass pools, flops counts, save_csr measures and the trainer decays the same weights."""
    from fxsparse.train.recipe import decayed_parameters

    model = Decoder().eval()
    prunable = set(prunable_weight_names(model))
    assert prunable == {"down.weight", "up.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    sparse = fxsparse.sparsify(model, "st3sigma", 0.9)
    x = torch.randn(2, 3, 8, 8)
    assert {e.fqn for e in unique_entries(sparse)} == prunable
    report = fxsparse.flops(sparse, x)
    assert {r.name for r in report.weight_rows} == prunable
    densities = fxsparse.layer_densities(sparse)
    assert all(report.row(name).density == nz / n for name, (nz, n) in densities.items())
    metadata = save_csr(sparse, tmp_path / "d.safetensors").metadata
    assert metadata["sparsity"] == fxsparse.realized_sparsity(sparse)  # old code: 0.899 vs 0.623
    decayed = {id(p) for p in decayed_parameters(sparse)}
    assert decayed == {id(e.original) for e in unique_entries(sparse)}


@pytest.mark.parametrize("method", ["st3", "st3sigma", "feather", "ste"])
def test_conv_transpose_sparsifies_as_the_conv_of_its_transposed_weight(method):
    """ST-3's per-output-channel rescale runs over dim 1 of a ConvTranspose weight (I, O, k, k), and
    ST-3-sigma's S_l = O + I + k + k: the effective weight is the transpose of that of a Conv2d whose
    (O, I, k, k) weight is the transposed one."""
    up = nn.Sequential(nn.ConvTranspose2d(6, 10, 3))
    conv = nn.Sequential(nn.Conv2d(6, 10, 3))
    with torch.no_grad():
        conv[0].weight.copy_(up[0].weight.transpose(0, 1))
    sparse_up, sparse_conv = fxsparse.sparsify(up, method, 0.6), fxsparse.sparsify(conv, method, 0.6)
    sparse_up(torch.randn(1, 6, 4, 4))
    sparse_conv(torch.randn(1, 6, 4, 4))
    assert torch.equal(fxsparse.get_threshold(sparse_up).tau, fxsparse.get_threshold(sparse_conv).tau)
    effective_up, effective_conv = (m.get_submodule("0").weight for m in (sparse_up, sparse_conv))
    assert torch.equal(effective_up, effective_conv.transpose(0, 1))


def test_grouped_conv_transpose_stays_dense_named_and_counted_dense(tmp_path):
    model = Decoder(transpose_groups=2).eval()
    with pytest.warns(UserWarning, match=r"(?s)leaves 1 weight.*dense.*up.weight: a transposed conv with groups=2"):
        sparse = fxsparse.sparsify(model, "st3", 0.9)
    x = torch.randn(2, 3, 8, 8)
    sparse(x)
    assert "up.weight" not in {e.fqn for e in unique_entries(sparse)}
    assert fxsparse.flops(sparse, x).row("up.weight").density == 1.0
    zeros = sum(n - nz for nz, n in fxsparse.layer_densities(sparse).values())
    total = sum(p.numel() for name, p in model.named_parameters() if name in prunable_weight_names(model))
    assert save_csr(sparse, tmp_path / "g.safetensors").metadata["sparsity"] == pytest.approx(zeros / total, abs=1e-12)


def test_conv_transpose_csr_is_the_out_in_matrix_and_round_trips(tmp_path):
    model = Decoder(transpose_groups=2).eval()
    with torch.no_grad():  # prune by hand, so that the grouped transposed conv is sparse too
        for weight in (model.up.weight, model.down.weight):
            weight.mul_(torch.rand_like(weight) < 0.1)
    save_csr(model, tmp_path / "u.safetensors")
    entry = read_csr_metadata(tmp_path / "u.safetensors")["tensors"]["up.weight"]
    assert entry["layout"] == "csr" and (entry["output_axis"], entry["groups"]) == (1, 2)
    from safetensors.torch import load_file

    crow = load_file(str(tmp_path / "u.safetensors"))["up.weight::crow_indices"]
    assert crow.numel() == 8 + 1  # one row per output channel
    state = load_csr(tmp_path / "u.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_the_format_page_reader_reads_transposed_layouts(tmp_path, monkeypatch):
    """docs/FORMAT.md's numpy/scipy snippet, run as written (scipy.sparse stood in by numpy)."""
    import re
    import sys
    import types
    from pathlib import Path

    import numpy as np

    class CsrMatrix:
        def __init__(self, parts, shape):
            values, col, crow = parts
            self.dense = np.zeros(shape, dtype=values.dtype)
            for row in range(shape[0]):
                self.dense[row, col[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]

        def toarray(self):
            return self.dense

    scipy = types.ModuleType("scipy")
    scipy.sparse = types.ModuleType("scipy.sparse")
    scipy.sparse.csr_matrix = CsrMatrix
    monkeypatch.setitem(sys.modules, "scipy", scipy)
    monkeypatch.setitem(sys.modules, "scipy.sparse", scipy.sparse)

    page = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    snippet = re.search(r"## Reading it elsewhere.*?```python\n(.*?)```", page, re.S).group(1)
    model = Decoder(transpose_groups=2).eval()
    with torch.no_grad():
        for module in (model.up, model.down, model.head):
            module.weight.mul_(torch.rand_like(module.weight) < 0.1)
    path = str(tmp_path / "d.safetensors")
    save_csr(model, path)
    for name in ("up.weight", "down.weight", "head.weight"):
        scope = {"path": path, "name": name}
        exec(snippet, scope)
        assert np.array_equal(scope["weight"], model.state_dict()[name].numpy()), name


class ToyLM(nn.Module):
    """Embedding -> Linear -> head tied to the embedding (traceable: the graph path)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.body = nn.Linear(12, 12)
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.3)  # the body keeps weights at the pool's threshold

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


@pytest.mark.parametrize("include", [False, True])
def test_tied_embedding_on_the_graph_path_folds_to_what_the_sparse_model_computes(include):
    ids = torch.randint(0, 30, (4, 7))
    if include:
        sparse = fxsparse.sparsify(ToyLM(), "st3", 0.7, include_embedding_tied=True)
    else:
        with pytest.warns(UserWarning, match="head.weight: tied to the embedding embed.*include_embedding_tied=True"):
            sparse = fxsparse.sparsify(ToyLM(), "st3", 0.7)
    with torch.no_grad():
        logits = sparse(ids)
        assert torch.equal(fxsparse.fold(sparse)(ids), logits)  # old code: differ by up to several units
    pooled = {e.fqn for e in unique_entries(sparse)}
    assert ("embed.weight" in pooled or "head.weight" in pooled) == include and "body.weight" in pooled
    if include:
        assert torch.equal(sparse.embed.weight, sparse.head.weight)
        assert fxsparse.realized_sparsity(sparse) == pytest.approx(0.7, abs=1 / 500)
    assert 0 < fxsparse.layer_densities(sparse)["body.weight"][0]  # the embedding matters to the output


def test_a_weight_tied_to_an_excluded_use_stays_dense_with_a_warning():
    from models import TiedLinear

    x = torch.randn(3, 12)
    with pytest.warns(UserWarning, match=r"a.weight: tied to the excluded 'b.weight'"):
        sparse = fxsparse.sparsify(TiedLinear(), "st3", 0.5, exclude="b.*")
    assert {e.fqn for e in unique_entries(sparse)} == {"c.weight"}
    with torch.no_grad():
        assert torch.equal(fxsparse.fold(sparse)(x), sparse(x))
