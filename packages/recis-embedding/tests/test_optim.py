from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recis_embedding import (
    ConfigError,
    Constant,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    OptimizerError,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseRowWiseAdagrad,
    SparseSGD,
    leaving_out,
    load,
    save,
    sparse_parameters,
)

DIM = 4
IDS = torch.tensor([11, -3, 1 << 60, 7])
INIT = Normal(std=1.0)


def _batches(steps: int) -> list[torch.Tensor]:
    """Every batch touches every id (so per-row and global step counts agree)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        extra = IDS[torch.randint(0, 4, (6,), generator=g)]
        out.append(torch.cat([IDS, extra])[torch.randperm(10, generator=g)].view(5, 2))
    return out


def _loss(pooled: torch.Tensor, k: int) -> torch.Tensor:
    target = torch.linspace(-1, 1, pooled.numel()).view_as(pooled) * (k + 1)
    return (pooled - target).square().sum()


def _run_recis(make_opt, steps: int) -> torch.Tensor:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    opt = make_opt(engine)
    for k, ids in enumerate(_batches(steps)):
        _loss(engine({"f": ids})["f"], k).backward()
        opt.step()
        opt.zero_grad()
    return engine.table("f")[0].embeddings(IDS)


def _run_torch(make_opt, steps: int) -> torch.Tensor:
    weight = torch.nn.Parameter(INIT(IDS, DIM, "f").clone())
    opt = make_opt([weight])
    index = {x: k for k, x in enumerate(IDS.tolist())}
    for k, ids in enumerate(_batches(steps)):
        local = torch.tensor([index[x] for x in ids.view(-1).tolist()]).view(ids.shape)
        _loss(F.embedding_bag(local, weight, mode="sum"), k).backward()
        opt.step()
        opt.zero_grad()
    return weight.detach()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda e: SparseSGD(e, lr=0.05, weight_decay=0.1),
            lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1),
        ),
        (
            lambda e: SparseAdagrad(
                e, lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.2
            ),
            lambda p: torch.optim.Adagrad(
                p, lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.2
            ),
        ),
        (
            lambda e: SparseAdam(e, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1),
        ),
        (
            lambda e: SparseAdamW(e, lr=0.05, weight_decay=0.2),
            lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2),
        ),
    ],
    ids=["sgd", "adagrad", "adam", "adamw"],
)
def test_matches_torch_optimizer_on_touched_rows(ours, theirs) -> None:
    torch.testing.assert_close(_run_recis(ours, 5), _run_torch(theirs, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "weight_decay"), [(SparseAdam, 0.0), (SparseAdam, 0.1), (SparseAdamW, 0.1)]
)
def test_adam_updates_cpu_rows_where_they_live_as_the_gathered_update_does(
    cls, weight_decay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 tables on the CPU: Adam runs in the row store (no gather and scatter of whole
    rows), its parameters within the roundings of the square roots of the update through a
    gathered buffer (see ``adam_store_``), its moments and counts bit for bit those of that
    update. Adam's L2 weight decay adds the parameters to the gradients, so after a first step
    whose parameters came out an ulp apart (on CPUs whose vectorized square root is not
    correctly rounded) its moments follow within the same tolerance."""
    from recis_kernels import RowStore

    def run(in_store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
        opt = cls(engine, lr=0.05, weight_decay=weight_decay)
        with monkeypatch.context() as mp:
            if in_store:

                def refuse(*args, **kwargs):
                    raise AssertionError("whole rows gathered and scattered back")

                mp.setattr(RowStore, "update", refuse)
            else:
                mp.setattr(cls, "_in_store", None)
            for k, ids in enumerate(_batches(4)):
                _loss(engine({"f": ids})["f"], k).backward()
                opt.step()
                opt.zero_grad()
        table = engine.table("f")[0]
        return table.read_full(table.find(IDS))

    got, want = run(True), run(False)
    assert torch.equal(got[:, -1], want[:, -1])  # the counts
    if cls is SparseAdam and weight_decay:
        torch.testing.assert_close(got[:, DIM:], want[:, DIM:], rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(got[:, DIM:], want[:, DIM:])
    assert not torch.equal(got[:, :DIM], INIT(IDS, DIM, "f"))
    torch.testing.assert_close(got[:, :DIM], want[:, :DIM], rtol=1e-6, atol=1e-7)


def test_untouched_rows_and_state_stay_put() -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    opt = SparseAdam(engine, lr=0.1)
    engine({"f": torch.tensor([[1], [2]])})["f"].sum().backward()
    opt.step()
    opt.zero_grad()
    table, _ = engine.table("f")
    before = table.embeddings(torch.tensor([2]))
    engine({"f": torch.tensor([[1]])})["f"].sum().backward()
    opt.step()
    rows = table.find(torch.tensor([1, 2]))
    assert table.read_slot(rows, "step")[:, 0].tolist() == [2.0, 1.0]
    assert torch.equal(table.embeddings(torch.tensor([2])), before)


def test_lr_scheduler_drives_the_learning_rate() -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    opt = SparseSGD(engine, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    table, _ = engine.table("f")
    ids = torch.tensor([[5]])
    engine({"f": ids})  # inserts id 5
    opt.zero_grad()
    deltas = []
    for _ in range(3):
        before = table.embeddings(torch.tensor([5]))
        engine({"f": ids})["f"].sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        deltas.append(float((before - table.embeddings(torch.tensor([5])))[0, 0]))
    assert deltas == pytest.approx([1.0, 0.5, 0.25])


def test_gradient_accumulation_over_micro_batches() -> None:
    def run(micro: bool) -> torch.Tensor:
        engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
        opt = SparseAdam(engine, lr=0.1)
        ids = torch.tensor([[1], [2], [1], [3]])
        if micro:
            for half in (ids[:2], ids[2:]):
                engine({"f": half})["f"].square().sum().backward()
        else:
            engine({"f": ids})["f"].square().sum().backward()
        opt.step()
        return engine.table("f")[0].embeddings(torch.tensor([1, 2, 3]))

    torch.testing.assert_close(run(True), run(False))


@pytest.mark.parametrize(
    "make", [lambda e: SparseRowWiseAdagrad(e, lr=0.1), lambda e: SparseFTRL(e, lr=0.5, l1=0.01)]
)
def test_rowwise_adagrad_and_ftrl_update_and_keep_state(make) -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    opt = make(engine)
    table, _ = engine.table("f")
    engine({"f": torch.tensor([[4]])})["f"].sum().backward()
    before = table.embeddings(torch.tensor([4]))
    opt.step()
    after = table.embeddings(torch.tensor([4]))
    assert not torch.equal(before, after)
    first_slot = table.slots[0][0]
    assert bool((table.read_slot(table.find(torch.tensor([4])), first_slot) > 0).all())


def test_low_precision_tables_update_in_float32() -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT, dtype=torch.bfloat16)})
    opt = SparseSGD(engine, lr=0.5)
    table, _ = engine.table("f")
    start = INIT(torch.tensor([9]), DIM, "f").bfloat16().float()
    engine({"f": torch.tensor([[9]])})["f"].sum().backward()
    assert torch.equal(table.embeddings(torch.tensor([9])), start)
    opt.step()
    assert torch.equal(table.embeddings(torch.tensor([9])), (start - 0.5).bfloat16().float())


def test_sparse_parameters_and_errors() -> None:
    model = torch.nn.Sequential(
        EmbeddingEngine({"a": EmbeddingOption(4), "b": EmbeddingOption(8)}),
        EmbeddingEngine({"c": EmbeddingOption(4, trainable=False)}),
    )
    tables = sparse_parameters(model)
    assert sorted(t.dim for t in tables) == [4, 8]
    assert not any(p is t.handle for p in model.parameters() for t in tables)
    with pytest.raises(OptimizerError, match="got no tables"):
        SparseSGD([])
    with pytest.raises(OptimizerError, match="lr must be >= 0"):
        SparseSGD(tables, lr=-1.0)
    SparseSGD(tables[:1])
    with pytest.raises(Exception, match="one sparse optimizer per table"):
        SparseAdam(tables[:1])


def test_optimizers_built_while_leaving_tables_out_give_them_no_state_or_steps() -> None:
    user = EmbeddingEngine({"u": EmbeddingOption(4, initializer=INIT)})
    item = EmbeddingEngine({"i": EmbeddingOption(4, initializer=INIT)})
    model = torch.nn.ModuleDict({"user": user, "item": item})
    user({"u": IDS.view(2, 2)})
    item({"i": IDS.view(2, 2)})
    frozen = item.table("i")[0]
    before = frozen.read_full(frozen.find(IDS, 0)).clone()
    with leaving_out(item):
        adagrad = SparseAdagrad(model, lr=0.1)
        # A group of left-out tables only stays, empty.
        adagrad.add_param_group({"params": [frozen], "lr": 0.5})
    assert adagrad.tables() == [user.table("u")[0]]
    assert frozen.optimizer_kind is None
    assert frozen.state_width == 0
    out = user({"u": IDS.view(2, 2)})["u"].sum() + item({"i": IDS.view(2, 2)})["i"].sum()
    out.backward()
    adagrad.step()
    assert torch.equal(frozen.read_full(frozen.find(IDS, 0)), before)
    SparseAdam(item, lr=0.1)  # the table's first optimizer, of another kind than the user's
    assert frozen.optimizer_kind == "adam"
    with (
        pytest.raises(OptimizerError, match="HashTables or a module"),
        leaving_out([torch.zeros(2)]),
    ):
        pass


def test_zero_grad_between_forward_and_backward_keeps_the_lookups_gradient() -> None:
    # torch's tutorials call zero_grad() after the forward pass; the rows read must still train.
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    opt = SparseSGD(engine, lr=0.5)
    table, _ = engine.table("f")
    ids = torch.tensor([[3], [5]])
    before = INIT(ids[:, 0], DIM, "f")
    out = engine({"f": ids})["f"]
    opt.zero_grad()
    out.sum().backward()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 0.5)
    # A gradient computed before zero_grad() is dropped, as torch drops a parameter's.
    engine({"f": ids})["f"].sum().backward()
    opt.zero_grad()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 0.5)
    # A lookup an optimizer step went past before its backward: no step would apply its
    # gradient, so the backward raises instead of losing it.
    out = engine({"f": ids})["f"]
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="arrived after an optimizer step or zero_grad"):
        out.sum().backward()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 0.5)
    # So does a second backward through a retained graph after the step that applied the
    # first: torch would apply it at the next step, which no table step could do.
    loss = engine({"f": ids})["f"].sum()
    loss.backward(retain_graph=True)
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="arrived after an optimizer step or zero_grad"):
        loss.backward()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 1.0)
    # And one through a graph retained past the zero_grad() that dropped the first gradient
    # (it was lost without a word: the lookup was no longer pending).
    loss = engine({"f": ids})["f"].sum()
    loss.backward(retain_graph=True)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"again through a retained graph after zero_grad"):
        loss.backward()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 1.0)
    # A lookup whose output no loss uses is passed by steps quietly.
    engine({"f": ids})
    opt.step()
    opt.zero_grad()
    engine({"f": ids})["f"].sum().backward()
    opt.step()
    torch.testing.assert_close(table.embeddings(ids[:, 0]), before - 1.5)


class _TwoTowers(torch.nn.Module):
    def __init__(self, user: torch.nn.Module, item: torch.nn.Module) -> None:
        super().__init__()
        self.user = user
        self.item = item


@pytest.mark.parametrize(
    "model",
    [
        _TwoTowers(
            EmbeddingEngine({"id": EmbeddingOption(4)}),
            EmbeddingEngine({"x": EmbeddingOption(8, shared_name="id")}),
        ),
        _TwoTowers(DynamicEmbedding(EmbeddingOption(4)), DynamicEmbedding(EmbeddingOption(4))),
    ],
    ids=["engines", "dynamic"],
)
def test_a_table_name_defined_by_two_modules_is_refused_before_training(model, tmp_path) -> None:
    name = "'id'" if isinstance(model.user, EmbeddingEngine) else "'embedding'"
    match = f"'user' and 'item' both define table {name}"
    with pytest.raises(ConfigError, match=match):
        sparse_parameters(model)
    with pytest.raises(ConfigError, match=match):
        SparseAdam(model)
    with pytest.raises(ConfigError, match=match):
        SparseSGD(EmbeddingEngine({"z": EmbeddingOption(4)})).add_param_group({"params": model})
    with pytest.raises(ConfigError, match=match):
        save(tmp_path / "ckpt", model)
    save(tmp_path / "ckpt", EmbeddingEngine({"id": EmbeddingOption(4)}))
    with pytest.raises(ConfigError, match=match):
        load(tmp_path / "ckpt", model)
    # One module in two places of a model is one table, not two.
    shared = EmbeddingEngine({"id": EmbeddingOption(4)})
    assert len(sparse_parameters(_TwoTowers(shared, shared))) == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_leaves_rows_without_gradient_alone_like_sparse_adam(set_to_none) -> None:
    # torch.optim.SparseAdam on a sparse nn.Embedding: after zero_grad(set_to_none=False) the
    # gradient is an empty sparse tensor and step() changes no row; the sparse tables agree
    # for either value (no step on zero gradients decaying the moments).
    weight = torch.nn.Embedding(4, DIM, sparse=True)
    theirs = torch.optim.SparseAdam(weight.parameters(), lr=0.1)
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})
    ours = SparseAdam(engine, lr=0.1)
    table, _ = engine.table("f")
    ids = torch.tensor([[1], [2]])
    for module, opt in ((weight, theirs), (engine, ours)):
        out = module(ids) if module is weight else module({"f": ids})["f"]
        out.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    before = (weight.weight.detach().clone(), table.embeddings(ids[:, 0]))
    rows = table.find(ids[:, 0])
    state = {s: table.read_slot(rows, s).clone() for s in ("exp_avg", "exp_avg_sq", "step")}
    theirs.step()
    ours.step()
    assert torch.equal(weight.weight.detach(), before[0])
    assert torch.equal(table.embeddings(ids[:, 0]), before[1])
    for slot, value in state.items():
        assert torch.equal(table.read_slot(rows, slot), value), slot
    # The next backward's gradient alone drives the following step, either way.
    engine({"f": ids})["f"].sum().backward()
    ours.step()
    assert table.read_slot(rows, "step")[:, 0].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    "make", [SparseSGD, SparseAdagrad, SparseRowWiseAdagrad, SparseAdam, SparseAdamW, SparseFTRL]
)
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("maximize", True),
        ("foreach", True),
        ("fused", True),
        ("capturable", True),
        ("differentiable", True),
        ("momentum", 0.9),
        ("nesterov", True),
        ("amsgrad", True),
        ("centered", True),
        ("decoupled_weight_decay", True),
    ],
)
def test_torch_flags_are_refused_by_name_unless_at_their_defaults(make, flag, value) -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM)})
    with pytest.raises(OptimizerError, match=f"{flag}={value} is not supported for sparse tables"):
        make(engine, **{flag: value})
    default = {
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "momentum": 0,
        "nesterov": False,
        "amsgrad": False,
        "centered": False,
        "decoupled_weight_decay": False,
    }.get(flag)
    opt = make(engine, **{flag: default})
    engine({"f": torch.tensor([[1]])})["f"].sum().backward()
    opt.step()
    with pytest.raises(TypeError, match="unexpected keyword argument 'nesterov_like'"):
        make(EmbeddingEngine({"g": EmbeddingOption(DIM)}), nesterov_like=True)


def _table_module() -> DynamicEmbedding:
    return DynamicEmbedding(EmbeddingOption(2, initializer=Constant(0.5)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda e: SparseSGD(e, lr=float("nan")), r"SparseSGD: lr must be >= 0, got nan"),
        (lambda e: SparseAdam(e, eps=float("inf")), r"SparseAdam: eps must be finite, got inf"),
        (lambda e: SparseSGD(e, lr="0.1"), r"SparseSGD: lr must be a real number, got str '0\.1'"),
        (lambda e: SparseAdam(e, betas=0.9), r"betas must be two numbers in \[0, 1\), got 0\.9"),
        (
            lambda e: SparseAdam([{"params": sparse_parameters(e), "betas": (1.0, 0.999)}]),
            r"betas must be two numbers in \[0, 1\) in a param group, got \(1\.0, 0\.999\)",
        ),
        (lambda e: SparseFTRL(e, lr=0.0), r"SparseFTRL: lr must be > 0, got 0\.0"),
        (
            lambda e: SparseFTRL([{"params": sparse_parameters(e), "lr_power": 0.5}]),
            r"SparseFTRL: lr_power must be <= 0 in a param group, got 0\.5",
        ),
        (
            lambda e: SparseAdagrad(e, initial_accumulator_value=-1.0),
            r"SparseAdagrad: initial_accumulator_value must be >= 0 and finite, got -1\.0",
        ),
        (
            lambda e: SparseAdam([{"params": sparse_parameters(e), "maximize": True}]),
            r"SparseAdam: maximize=True in a param group is not supported",
        ),
        (
            lambda e: SparseSGD([{"params": sparse_parameters(e), "momentum": 0.9}]),
            r"SparseSGD: momentum=0\.9 in a param group is not supported",
        ),
    ],
)
def test_hyperparameters_are_checked_wherever_they_come_from(make, message) -> None:
    # Each was accepted and then wrote NaN/inf into the rows, or was ignored (a group's
    # maximize or momentum), or failed with a bare TypeError.
    with pytest.raises(OptimizerError, match=message):
        make(_table_module())


def test_a_loaded_state_is_checked_like_given_hyperparameters() -> None:
    e = _table_module()
    opt = SparseAdam(e, lr=0.1)
    good = opt.state_dict()
    for bad, message in [
        ({"lr": -1.0}, r"lr must be >= 0 in param group 0 of the state, got -1\.0"),
        ({"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\) in param group 0"),
        ({"amsgrad": True}, r"amsgrad=True in param group 0 of the state is not supported"),
    ]:
        state = {**good, "param_groups": [good["param_groups"][0] | bad]}
        with pytest.raises(OptimizerError, match=message):
            opt.load_state_dict(state)
        assert opt.param_groups[0]["lr"] == 0.1  # nothing loaded


def test_ftrl_refuses_a_scheduled_zero_learning_rate_before_updating() -> None:
    e = _table_module()
    opt = SparseFTRL(e, lr=0.1)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=2)
    for _ in range(2):
        e(torch.tensor([1])).sum().backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    before = e.table.lookup(torch.tensor([1])).clone()
    e(torch.tensor([1])).sum().backward()
    with pytest.raises(OptimizerError, match=r"SparseFTRL: lr must be > 0, got 0\.0 at this step"):
        opt.step()
    assert torch.equal(e.table.lookup(torch.tensor([1])), before)
    assert torch.isfinite(before).all()


def test_an_optimizer_built_again_keeps_rows_state_and_gives_new_rows_its_initial_values():
    eng = EmbeddingEngine({"f": EmbeddingOption(2)})
    table, index = eng.table("f")
    first = SparseAdagrad(eng, lr=0.1, initial_accumulator_value=0.1)
    eng({"f": torch.tensor([1])})["f"].sum().backward()
    first.step()
    first.zero_grad()
    (row,) = table.find(torch.tensor([1]), index)
    trained = table.read_slot(row[None], "sum").clone()
    again = SparseAdagrad(eng, lr=0.1, initial_accumulator_value=5.0)
    assert torch.equal(table.read_slot(row[None], "sum"), trained)  # kept
    eng({"f": torch.tensor([7])})["f"].sum().backward()
    (new,) = table.find(torch.tensor([7]), index)
    assert table.read_slot(new[None], "sum").tolist() == [[5.0, 5.0]]
    again.zero_grad()


def test_a_tensor_learning_rate_is_saved_as_its_value_and_loads_into_the_tensor(tmp_path):
    eng = EmbeddingEngine({"f": EmbeddingOption(2)})
    opt = SparseAdam(eng, lr=torch.tensor(0.01))
    eng({"f": torch.tensor([1])})["f"].sum().backward()
    opt.step()
    opt.zero_grad()
    opt.param_groups[0]["lr"].fill_(0.02)  # as a scheduler sets it
    save(tmp_path / "ckpt", eng, opt)
    other = EmbeddingEngine({"f": EmbeddingOption(2)})
    rate = torch.tensor(0.5)
    resumed = SparseAdam(other, lr=rate)
    load(tmp_path / "ckpt", other, resumed)
    assert resumed.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(0.02)


# -- what keeps a table alive ---------------------------------------------------------------------


def _trained(shard: bool = False) -> tuple[EmbeddingEngine, SparseAdam]:
    engine = EmbeddingEngine({"a": EmbeddingOption(4)}, shard=shard)
    opt = SparseAdam(engine, lr=0.1)
    engine({"a": torch.tensor([[1], [2]])})["a"].sum().backward()
    opt.step()
    opt.zero_grad()
    return engine, opt


@pytest.mark.parametrize("shard", [False, True])
def test_a_table_nothing_uses_is_freed_at_once(shard: bool, tmp_path) -> None:
    # Its handle led back to it: table and handle formed a cycle, freed only by a later
    # garbage collection (a sharded table's process group with it, destroyed that late).
    import gc
    import weakref

    import torch.distributed as dist

    if shard:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    gc.collect()
    gc.disable()
    try:
        engine, opt = _trained(shard)
        table = weakref.ref(engine.physical[0])
        del engine
        assert table() is not None  # the optimizer keeps its tables
        del opt
        assert table() is None
    finally:
        gc.enable()
        if shard:
            dist.destroy_process_group()


def test_a_copied_or_saved_optimizer_keeps_its_tables() -> None:
    import copy
    import io

    engine, opt = _trained()
    twin = copy.deepcopy(opt)
    assert [t.ids().tolist() for t in twin.tables()] == [[1, 2]]
    assert twin.tables()[0] is not engine.physical[0]
    buffer = io.BytesIO()
    torch.save(opt, buffer)  # torch.save drops the handles' attributes; this lost the tables
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [t.ids().tolist() for t in loaded.tables()] == [[1, 2]]
