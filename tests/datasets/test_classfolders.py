"""A folder of images labelled by class name (``datasets/classfolders.py``): how folder names
become class names, the cap per class, and the refusals that name the folder and the layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlprompt.datasets import read_class_folders
from vlprompt.datasets.files import UnsafePathError


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_folder_names_become_class_names_underscores_as_spaces_case_kept(tmp_path: Path) -> None:
    for rel in ("golden_retriever/b.png", "golden_retriever/a.jpg", "Faces/1.JPEG", "tabby cat/x.png"):
        image(tmp_path / rel)
    (tmp_path / "golden_retriever" / "notes.txt").write_text("not an image")
    image(tmp_path / "golden_retriever" / ".hidden.png")
    splits = read_class_folders(tmp_path)
    # sorted folder order ("F" < "g" < "t"), labels in that order
    assert splits.classnames == ("Faces", "golden retriever", "tabby cat")
    assert [(Path(d.path).relative_to(tmp_path).as_posix(), d.label, d.classname) for d in splits.train] == [
        ("Faces/1.JPEG", 0, "Faces"),
        ("golden_retriever/a.jpg", 1, "golden retriever"),
        ("golden_retriever/b.png", 1, "golden retriever"),
        ("tabby cat/x.png", 2, "tabby cat"),
    ]
    assert splits.val == splits.test == () and splits.name == "folder"
    assert [d.path for d in read_class_folders(tmp_path, images_per_class=1).train] == [
        str(tmp_path / "Faces/1.JPEG"),
        str(tmp_path / "golden_retriever/a.jpg"),
        str(tmp_path / "tabby cat/x.png"),
    ]


def test_classnames_txt_names_what_a_folder_cannot_and_one_name_is_one_class(tmp_path: Path) -> None:
    for rel in ("n001/a.png", "n002/a.png", "n003/a.png", "n003/b.png", "crane/c.png", "extra_one/e.png"):
        image(tmp_path / rel)
    # ImageNet's classnames.txt format; two wnids with one name (ImageNet's two cranes) and a
    # folder of that name are one class; a folder it does not list keeps its own name
    (tmp_path / "classnames.txt").write_text("n001 baluster / handrail\nn002 crane\nn003 crane\nn009 gone\n")
    splits = read_class_folders(tmp_path)
    assert splits.classnames == ("crane", "extra one", "baluster / handrail")
    counts = {c: sum(d.classname == c for d in splits.train) for c in splits.classnames}
    assert counts == {"crane": 4, "extra one": 1, "baluster / handrail": 1}
    assert sum(d.classname == "crane" for d in read_class_folders(tmp_path, 2).train) == 2


def test_a_missing_or_empty_folder_is_refused_naming_it_and_the_layout(tmp_path: Path) -> None:
    gone = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{gone} does not exist.*<class name>/<image>"):
        read_class_folders(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"holds no class folder; expected layout"):
        read_class_folders(tmp_path)
    image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"holds 1 images directly but no class folder"):
        read_class_folders(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"has 1 class folders but no image in them \(files ending .*\.jpg"):
        read_class_folders(tmp_path)


def test_classnames_txt_cannot_name_a_path(tmp_path: Path) -> None:
    image(tmp_path / "cat" / "a.png")
    (tmp_path / "classnames.txt").write_text("../cat tabby\n")
    with pytest.raises(UnsafePathError, match=r"classnames.txt: class folder: image path '\.\./cat' refused"):
        read_class_folders(tmp_path)
    (tmp_path / "classnames.txt").write_text("a/cat tabby\n")
    with pytest.raises(ValueError, match=r"'a/cat' is not a folder name"):
        read_class_folders(tmp_path)
