"""evaluate.py's own work in-process (perceiver/experiment/evaluation.py): the image files a prediction run is
given. (The entry point end to end: tests/e2e/test_evaluate.py.)"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from perceiver.experiment.evaluation import image_files, unreadable_images


def test_image_files_and_unreadable_ones(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.jpg", "broken.png", "c.png"]
    assert [p.name for p in image_files(tmp_path / "*.png")] == ["a.png", "broken.png"]
    assert [p.name for p in image_files(os.path.join(tmp_path, "**", "*.png"))] == ["a.png", "broken.png", "c.png"]
    bad = unreadable_images(image_files(tmp_path))
    assert len(bad) == 1 and bad[0].startswith(str(tmp_path / "broken.png")) and "cannot identify" in bad[0]
    assert image_files(tmp_path / "nothing-*.png") == []
