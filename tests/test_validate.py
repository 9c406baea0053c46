"""Validation sharded over 2 gloo processes (the whole model on each, as DDP; and FSDP2-sharded, validated
inside ``gathered``) gives every process exactly the figures of one process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lens_fast.data.synthetic import SyntheticRefDataset
from lens_fast.model import build_tiny_lens
from lens_fast.training.distributed import World, gathered, shard_model
from lens_fast.training.validate import validate

SIZE, BATCH = 7, 2  # 4 batches (the last of 1 sample): process 0 takes batches 0 and 2, process 1 batches 1 and 3
OPTIONS = dict(size=SIZE, batch_size=BATCH, collapse_samples=5)


def _model():
    """The tiny model, its ``predict`` counting the samples it is given (``model.predicted``)."""
    model = build_tiny_lens(seed=0, max_new_tokens=8)
    model.predicted = []
    predict = model.predict

    def counted(images, expressions, *args, **kwargs):
        model.predicted.append(len(expressions))
        return predict(images, expressions, *args, **kwargs)

    model.predict = counted
    return model


def _dataset():
    return SyntheticRefDataset("val", seed=0)


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        world = World(rank, 2, torch.device("cpu"))
        model = _model()
        whole = validate(model, _dataset(), world=world, **OPTIONS)
        predicted = model.predicted
        model = shard_model(_model(), world)
        with gathered(model):
            sharded = validate(model, _dataset(), world=world, **OPTIONS)
        torch.save({"ddp": whole, "fsdp": sharded, "predicted": predicted}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        return validate(model, _dataset(), **OPTIONS), model.predicted
    finally:
        torch.set_num_threads(before)


def test_one_process_figures(one_process):
    figures, predicted = one_process
    assert set(figures) == {"mask_iou", "cIoU", "box_iou", "box_acc", "expression_dependence"}
    assert 0.0 < figures["mask_iou"] < 1.0 and 0.0 < figures["cIoU"] < 1.0
    assert predicted == [2, 2, 2, 1, 2, 2, 1]  # 7 samples in 4 batches, then 5 collapse pairs in 3


def test_two_gloo_processes_validate_as_one(tmp_path, one_process):
    figures, _ = one_process
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for result in results:
        assert result["ddp"] == figures
        assert result["fsdp"] == figures
    # each process predicted its share only: batches 0, 2 and pair chunks 0, 2 / batches 1, 3 and pair chunk 1
    assert [r["predicted"] for r in results] == [[2, 2, 2, 1], [2, 1, 2]]


def test_validate_checks_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        validate(_model(), _dataset(), size=2, batch_size=0)
