"""``.to()``/``.cuda()``/``.half()`` of modules holding embedding tables."""

from __future__ import annotations

import io

import pytest
import torch

from recis_embedding import (
    ConfigError,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    SparseAdam,
    load,
    save,
)

DIM = 4
META = torch.device("meta")  # another device on a machine without a GPU


class Model(torch.nn.Module):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        init = Normal(std=0.5)
        self.emb = EmbeddingEngine(
            {
                "user": EmbeddingOption(DIM, initializer=init, device=device),
                "item": EmbeddingOption(DIM, initializer=init, dtype=torch.bfloat16, device=device),
            }
        )
        self.head = torch.nn.Linear(2 * DIM, 1, device=device)
        self.register_buffer("scale", torch.ones(1, device=device))

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.emb(batch)
        x = torch.cat([out["user"], out["item"]], 1).to(self.head.weight.dtype)
        return (self.head(x) * self.scale).square().sum()


def batch(device: torch.device | str = "cpu") -> dict:
    ids = torch.tensor([[1], [2], [3]], device=device)
    return {"user": ids, "item": ids + 10}


@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.to(META),
        lambda m: m.to("meta"),
        lambda m: m.to(device=META, dtype=torch.float16),
        lambda m: m.to_empty(device=META),
    ],
    ids=["to-device", "to-str", "to-device-and-dtype", "to_empty"],
)
def test_moving_tables_to_another_device_raises_naming_them(move) -> None:
    model = Model()
    with pytest.raises(
        ConfigError,
        match=r"cannot move EmbeddingEngine to meta: its tables \['item', 'user'\] on cpu would "
        r"stay behind .*EmbeddingOption\(\.\.\., device='meta'\)",
    ):
        move(model)
    # Refused before anything moved: the engine comes first in the model.
    assert model.head.weight.device.type == "cpu"
    assert model.scale.device.type == "cpu"
    assert model(batch()).isfinite()


def test_moving_a_dynamic_embedding_names_its_table() -> None:
    emb = DynamicEmbedding(EmbeddingOption(DIM), name="words")
    with pytest.raises(ConfigError, match=r"tables \['words'\] on cpu would stay behind"):
        emb.to(META)


@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.cpu(),
        lambda m: m.to("cpu"),
        lambda m: m.to(torch.device("cpu")),
        lambda m: m.to(torch.empty(0)),
        lambda m: m.float(),
    ],
    ids=["cpu", "to-str", "to-device", "to-tensor", "float"],
)
def test_a_move_to_the_tables_device_works(move) -> None:
    model = Model()
    opt = SparseAdam(model, lr=0.1)
    assert move(model) is model
    model(batch()).backward()
    opt.step()
    assert model.emb.rows_per_table() == {"user": 3, "item": 3}


@pytest.mark.parametrize(
    ("cast", "dense"),
    [
        (lambda m: m.half(), torch.float16),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to("cpu", torch.float64), torch.float64),
    ],
    ids=["half", "double", "bfloat16", "to-dtype", "to-cpu-and-dtype"],
)
def test_dtype_casts_cast_the_dense_part_and_leave_tables_as_declared(
    cast, dense, tmp_path
) -> None:
    model = Model()
    opt = SparseAdam(model, lr=0.1)
    model(batch()).backward()
    opt.step()
    opt.zero_grad()
    saved = save(tmp_path / "before", model, opt)
    tables = {n: model.emb.table(n)[0] for n in ("user", "item")}
    rows = {n: t.read_full(t.find(t.ids())).clone() for n, t in tables.items()}

    cast(model)
    assert model.head.weight.dtype == dense
    assert model.scale.dtype == dense
    assert tables["user"].dtype == torch.float32
    assert tables["item"].dtype == torch.bfloat16
    for n, t in tables.items():
        assert torch.equal(t.read_full(t.find(t.ids())), rows[n]), n
    out = model.emb(batch())
    assert out["user"].dtype == torch.float32
    assert out["item"].dtype == torch.float32
    # The sparse optimizer's state columns survive the cast: a step still trains both tables.
    model(batch()).backward()
    opt.step()
    for n, t in tables.items():
        assert not torch.equal(t.read_full(t.find(t.ids())), rows[n]), n
    # Checkpoints of the cast model load back into it (embeddings in the option's dtype).
    save(tmp_path / "after", model, opt)
    load(saved, model, opt)
    for n, t in tables.items():
        assert torch.equal(t.read_full(t.find(t.ids())), rows[n]), n


def test_an_engine_without_tables_moves_freely() -> None:
    engine = EmbeddingEngine({})
    assert engine.to(META) is engine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_declared_on_cuda_allow_moves_to_cuda_only() -> None:
    model = torch.nn.ModuleDict(
        {
            "emb": EmbeddingEngine({"user": EmbeddingOption(DIM, device="cuda")}),
            "head": torch.nn.Linear(DIM, 1),  # built on the CPU, moved by .to()
        }
    )
    model.to("cuda")
    assert model["head"].weight.device.type == "cuda"
    model.cuda()
    model.to(torch.device("cuda", torch.cuda.current_device()))
    with pytest.raises(ConfigError, match=r"cannot move EmbeddingEngine to cpu: its tables"):
        model.cpu()


def test_a_model_loaded_with_map_location_has_its_tables_where_their_tensors_went() -> None:
    # torch.load(map_location=...) moves the tables' tensors; their recorded device (which
    # device checks and kernel launches go by) said where they were saved.
    model = Model()
    model(batch()).backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location=META, weights_only=False)
    tables = list(loaded.emb.physical)
    assert tables
    for table in tables:
        assert table.device == META
        assert table._map.device == table._map.slot_keys.device == META
        assert table._store.device == table._store.blocks[0].device == META
    loaded.to(META)  # its tables are on meta: moving the model there is allowed
    assert loaded.head.weight.device == META
