"""``python -m lens_fast.segment`` and ``python -m lens_fast.eval --checkpoint`` on a tiny checkpoint."""
import json

import numpy as np
import pycocotools.mask as coco_mask
import pytest
from PIL import Image

from lens_fast import eval as eval_cli
from lens_fast import segment as segment_cli
from lens_fast.data import SyntheticRefDataset
from lens_fast.model import LensModel, build_tiny_lens

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    build_tiny_lens(seed=0, max_new_tokens=12).save_pretrained(directory)
    return directory


def test_segment_cli(checkpoint, tmp_path, capsys):
    image = SyntheticRefDataset("val", size=1)[0].image
    Image.fromarray(image).convert("P").save(tmp_path / "scene.png")  # a palette PNG
    code = segment_cli.main(["--checkpoint", str(checkpoint), str(tmp_path / "scene.png"), "the red circle",
                             "--out", str(tmp_path / "overlay.png"), "--json", str(tmp_path / "out.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads((tmp_path / "out.json").read_text())
    assert f"answer: {record['text']}" in out and "box: " in out
    (want,) = LensModel.from_pretrained(checkpoint).eval().segment([tmp_path / "scene.png"], ["the red circle"])
    assert record["text"] == want.text
    mask = coco_mask.decode({"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()})
    assert np.array_equal(mask.astype(bool), want.mask) and mask.shape == image.shape[:2]
    assert Image.open(tmp_path / "overlay.png").size[0] >= image.shape[1]
    # without --json the record is printed
    assert segment_cli.main(["--checkpoint", str(checkpoint), str(tmp_path / "scene.png"), "the red circle"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] == want.text


def test_segment_cli_needs_a_checkpoint_and_good_input(checkpoint, tmp_path, capsys):
    Image.new("RGB", (20, 30)).save(tmp_path / "x.png")
    assert segment_cli.main([str(tmp_path / "x.png"), "the red circle"]) == 2
    err = capsys.readouterr().err
    assert "a trained checkpoint is needed" in err and "python -m lens_fast.train" in err
    assert segment_cli.main(["--checkpoint", str(tmp_path / "none"), str(tmp_path / "x.png"), "a"]) == 2
    assert "not a lens_fast checkpoint" in capsys.readouterr().err
    assert segment_cli.main(["--checkpoint", str(checkpoint), str(tmp_path / "missing.png"), "a"]) == 2
    assert "cannot read an image" in capsys.readouterr().err
    assert segment_cli.main(["--checkpoint", str(checkpoint), str(tmp_path / "x.png"), " "]) == 2
    assert "is empty" in capsys.readouterr().err


def test_eval_cli_with_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--data", "synthetic", "--split", "val", "--size", "5", "--checkpoint", str(checkpoint), "--batch-size", "2",
            "--output-dir", str(out), "--write-predictions", str(out / "preds.json"), "--vis", "2", "--no-progress"]
    assert eval_cli.main(argv) == 0
    table = capsys.readouterr().out
    assert f"checkpoint {checkpoint}" in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 5 and metrics["failed"] == 0 and metrics["checkpoint"] == str(checkpoint)
    predictions = json.loads((out / "preds.json").read_text())
    assert [p["sent_id"] for p in predictions] == list(range(5))
    # the batched run equals the model run one sample at a time
    dataset = SyntheticRefDataset("val", size=5)
    model = LensModel.from_pretrained(checkpoint).eval()
    for entry, index in zip(predictions, range(5)):
        sample = dataset[index]
        (want,) = model.segment([sample.image], [sample.expression])
        assert entry["text"] == want.text
        mask = coco_mask.decode({"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()})
        assert np.array_equal(mask.astype(bool), want.mask)
        assert ("bbox" in entry) == (want.box is not None)
    assert len(list((out / "vis").glob("*.png"))) == 2
    # the scores equal scoring the written predictions
    assert eval_cli.main(["--data", "synthetic", "--split", "val", "--size", "5", "--predictions", str(out / "preds.json"),
                          "--output-dir", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["cIoU"] == metrics["cIoU"] and again["gIoU"] == metrics["gIoU"]
    capsys.readouterr()
    assert eval_cli.main(["--data", "synthetic", "--checkpoint", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "not a lens_fast checkpoint" in capsys.readouterr().err
