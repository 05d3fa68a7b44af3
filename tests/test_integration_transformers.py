"""fxsparse.integrations.transformers.SparsifyCallback with a real transformers Trainer.train (tiny BERT and
Llama built from configs, random tokens, CPU)."""

import pytest
import torch
from torch import nn

import fxsparse

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from fxsparse.integrations.transformers import SparsifyCallback  # noqa: E402

VOCAB = 64
# transformers refuses torch.load (the Trainer's optimizer and RNG state) on torch < 2.6 (CVE-2025-32434)
RESUMES = pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6),
    reason="transformers' Trainer cannot resume from a checkpoint on torch < 2.6",
)


def _loader_sorts_mixed_keys() -> bool:
    """transformers 5.0's from_pretrained sorts state-dict keys by their dot-separated parts and fails where one
    key has a number and another a name at the same place (a parametrized layer's ``.0.`` and ``.original``)."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:
        return True
    try:
        sorted(["a.0", "a.b"], key=dot_natural_key)
    except TypeError:
        return False
    return True


LOADS_SPARSE_STATE = pytest.mark.skipif(
    not _loader_sorts_mixed_keys(),
    reason="this transformers' from_pretrained cannot sort a sparse model's state-dict keys (fixed after 5.0)",
)


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """32 random sequences of 8 tokens; a class label (BERT) or the tokens themselves (causal LM)."""

    def __init__(self, causal):
        self.causal = causal

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, VOCAB, (8,), generator=g)
        return {"input_ids": ids, "labels": ids.clone() if self.causal else torch.randint(0, 3, (), generator=g)}


MODELS = {"bert": (tiny_bert, Tokens(causal=False)), "llama": (tiny_llama, Tokens(causal=True))}


def arguments(tmp_path, **kwargs):
    options = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=1e-2,
        logging_steps=2,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def fresh(name):
    torch.manual_seed(0)
    return MODELS[name][0]()


def pooled_zeros(model):
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


class LogitsAtTrainEnd(transformers.TrainerCallback):
    """Listed before SparsifyCallback: sees the sparse model at on_train_end, before it is folded."""

    def __init__(self, inputs):
        self.inputs, self.logits, self.sparsified = inputs, None, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.sparsified = fxsparse.is_sparsified(model)
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.inputs).logits


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_train_ends_folded_at_the_requested_sparsity_and_reloads(name, tmp_path):
    """Trainer.train with the callback: exact final sparsity, logged values, a fold that computes what the sparse
    model computed, and save_pretrained / from_pretrained round trip of the plain weights with their zeros."""
    sparsity = 0.7
    model, data = fresh(name), MODELS[name][1]
    inputs = torch.stack([data[i]["input_ids"] for i in range(4)])
    spy = LogitsAtTrainEnd(inputs)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=data,
        callbacks=[spy, SparsifyCallback("st3sigma", sparsity, schedule="paper")],
    )
    trainer.train()

    total = trainer.state.max_steps  # 3 epochs of 32 samples, batches of 4, accumulated 2 by 2
    assert total == 12
    ramp = fxsparse.paper_schedule("st3sigma", total)
    records = [r for r in trainer.state.log_history if "fxsparse/target_sparsity" in r]
    assert [r["step"] for r in records] == list(range(2, total + 1, 2))  # the Trainer's logging steps
    for record in records:  # the values of the forward whose loss the record logs (schedule step = step - 1)
        target = ramp(record["step"] - 1, sparsity)
        assert record["fxsparse/target_sparsity"] == pytest.approx(target)
        assert (record["fxsparse/tau"] > 0) == (target > 0)
    zeros, count = pooled_zeros(model)
    assert records[-1]["fxsparse/realized_sparsity"] == pytest.approx(sparsity, abs=1 / count)

    assert spy.sparsified and not fxsparse.is_sparsified(model)
    assert abs(zeros - sparsity * count) <= 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs).logits, spy.logits)

    trainer.save_model(str(tmp_path / "final"))
    reloaded = type(model).from_pretrained(str(tmp_path / "final"))
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert sorted(saved) == sorted(loaded) == sorted(fresh(name).state_dict())
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@RESUMES
def test_resume_mid_ramp_is_bit_exact(tmp_path):
    """Uninterrupted vs resumed from checkpoint-3 (mid-ramp; dropout on, so the Trainer's RNG restore matters)."""

    def train(directory, resume=None):
        model = fresh("bert")
        args = arguments(directory, save_strategy="steps", save_steps=3)
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=MODELS["bert"][1],
            callbacks=[SparsifyCallback("feather", 0.8, schedule="paper")],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = train(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    assert any(".parametrizations.weight.original" in k for k in state)
    assert int(next(v for k, v in state.items() if k.endswith(".step"))) == 3
    assert 0 < fxsparse.paper_schedule("feather", 12)(3, 0.8) < 0.8  # mid-ramp

    resumed = train(tmp_path / "b", resume=str(checkpoint))
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@RESUMES
def test_resuming_into_a_model_the_callback_did_not_sparsify_first_is_refused(tmp_path):
    """A dense run's checkpoint, or a callback added after Trainer(...): transformers loads the checkpoint before
    on_train_begin and without strict keys, so the callback checks the schedule step against the global step."""
    dense = transformers.Trainer(
        model=fresh("bert"),
        args=arguments(tmp_path, save_strategy="steps", save_steps=3, max_steps=3),
        train_dataset=MODELS["bert"][1],
    )
    dense.train()
    trainer = transformers.Trainer(
        model=fresh("bert"),
        args=arguments(tmp_path / "b"),
        train_dataset=MODELS["bert"][1],
        callbacks=[SparsifyCallback("st3", 0.5)],
    )
    with pytest.raises(ValueError, match="resuming at global step 3.*schedule is at step 0"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_an_optimizer_built_before_the_trainer_trains_the_sparse_weights(tmp_path):
    """Trainer(optimizers=...) built on the dense model: sparsify_ keeps the Parameter objects it holds."""
    model = fresh("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=4),
        train_dataset=MODELS["bert"][1],
        optimizers=(optimizer, None),
        callbacks=[SparsifyCallback("ste", 0.5)],
    )
    trainer.train()
    query = "bert.encoder.layer.0.attention.self.query.weight"
    changed = model.get_parameter(query) != before[query]
    assert changed.float().mean() > 0.4  # the kept weights moved (pruned ones may stay: ste passes their gradient)
    zeros, count = pooled_zeros(model)
    assert abs(zeros - 0.5 * count) <= 1


@pytest.mark.parametrize("late", ["add_callback", "model_init"])
def test_a_model_the_callback_did_not_see_at_init_is_sparsified_at_train_begin(late, tmp_path):
    args, data = arguments(tmp_path, max_steps=2), MODELS["bert"][1]
    if late == "add_callback":
        trainer = transformers.Trainer(model=fresh("bert"), args=args, train_dataset=data)
        trainer.add_callback(SparsifyCallback("gmp", 0.5))
    else:  # train() replaces the model Trainer.__init__ made (and the callback sparsified) by a new one
        trainer = transformers.Trainer(
            model_init=lambda: fresh("bert"), args=args, train_dataset=data, callbacks=[SparsifyCallback("gmp", 0.5)]
        )
    trainer.train()
    zeros, count = pooled_zeros(trainer.model)
    assert not fxsparse.is_sparsified(trainer.model) and abs(zeros - 0.5 * count) <= 1


def test_bad_setups_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown sparsity method"):
        SparsifyCallback("st4")
    already = fresh("bert")
    fxsparse.sparsify_(already, "st3", 0.5)
    with pytest.raises(ValueError, match="already sparsified"):
        transformers.Trainer(
            model=already,
            args=arguments(tmp_path),
            train_dataset=MODELS["bert"][1],
            callbacks=[SparsifyCallback("st3", 0.5)],
        )
    with pytest.raises(ValueError, match="sparsity"):
        transformers.Trainer(
            model=fresh("bert"),
            args=arguments(tmp_path),
            train_dataset=MODELS["bert"][1],
            callbacks=[SparsifyCallback("st3", 90)],
        )


def assert_reloads_with(directory, want):
    """from_pretrained(directory) holds exactly the weights ``want`` (no key re-initialised)."""
    reloaded = transformers.BertForSequenceClassification.from_pretrained(str(directory))
    got = reloaded.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@LOADS_SPARSE_STATE
def test_save_after_evaluate_alone_reloads_the_weights(tmp_path):
    """The callback sparsifies the model when the Trainer is built; save_model after evaluate() alone must still
    write weights from_pretrained loads (they were silently re-initialised)."""
    model = fresh("bert")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    data = MODELS["bert"][1]
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[SparsifyCallback("st3sigma", 0.7, schedule="paper")],
    )
    trainer.evaluate()
    assert fxsparse.is_sparsified(model)
    trainer.save_model(str(tmp_path / "saved"))
    assert_reloads_with(tmp_path / "saved", dense)  # step 0 of the paper ramp: sparsity 0, the weights as they were


class RaiseAtStep(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@LOADS_SPARSE_STATE
def test_save_after_an_interrupted_train_reloads_the_sparse_models_weights(tmp_path):
    model = fresh("bert")
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=MODELS["bert"][1],
        callbacks=[SparsifyCallback("st3sigma", 0.7, schedule="paper"), RaiseAtStep(3)],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert fxsparse.is_sparsified(model) and 0 < fxsparse.get_threshold(model).target_sparsity() < 0.7  # mid-ramp
    folded = fxsparse.fold(model).state_dict()  # the weights the sparse model computes with
    trainer.save_model(str(tmp_path / "saved"))
    assert_reloads_with(tmp_path / "saved", folded)
    zeros, count = pooled_zeros(transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved")))
    assert zeros > 0.1 * count


@RESUMES
def test_a_checkpoint_reloads_as_the_model_at_that_step(tmp_path):
    """checkpoint-N/ loads with from_pretrained as the sparse model of step N, folded (and resumes, see above)."""
    spy = []

    class FoldedAtSave(transformers.TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            spy.append(fxsparse.fold(model).state_dict())

    trainer = transformers.Trainer(
        model=fresh("bert"),
        args=arguments(tmp_path, save_strategy="steps", save_steps=3, max_steps=3),
        train_dataset=MODELS["bert"][1],
        callbacks=[SparsifyCallback("feather", 0.8, schedule=fxsparse.Cubic(0, 6), fold_at_end=False), FoldedAtSave()],
    )
    trainer.train()
    assert_reloads_with(tmp_path / "checkpoint-3", spy[0])


class StopAtStep(transformers.TrainerCallback):
    """What EarlyStoppingCallback does when the metric stops improving: end training at this step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("finish_ramp", [False, True])
def test_training_that_ends_mid_ramp_warns_or_finishes_the_ramp(finish_ramp, tmp_path):
    model = fresh("bert")
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=MODELS["bert"][1],
        callbacks=[
            SparsifyCallback("st3sigma", 0.9, schedule="paper", **({"finish_ramp": True} if finish_ramp else {})),
            StopAtStep(2),
        ],
    )
    if finish_ramp:
        trainer.train()
    else:
        with pytest.warns(
            UserWarning, match=r"ended at step 2.*final sparsity 0.9.*folded at sparsity 0\.\d+.*finish_ramp"
        ):
            trainer.train()
    zeros, count = pooled_zeros(model)
    assert not fxsparse.is_sparsified(model)
    if finish_ramp:
        assert abs(zeros - 0.9 * count) <= 1
    else:
        assert 0 < zeros < 0.9 * count * 0.9


def test_the_same_callback_listed_twice_is_named(tmp_path):
    callback = SparsifyCallback("st3", 0.5)
    with pytest.raises(ValueError, match="listed twice"):
        transformers.Trainer(
            model=fresh("bert"),
            args=arguments(tmp_path),
            train_dataset=MODELS["bert"][1],
            callbacks=[callback, callback],
        )
    with pytest.raises(ValueError, match="sparsified by another SparsifyCallback"):
        transformers.Trainer(
            model=fresh("bert"),
            args=arguments(tmp_path),
            train_dataset=MODELS["bert"][1],
            callbacks=[SparsifyCallback("st3", 0.5), SparsifyCallback("st3", 0.5)],
        )
