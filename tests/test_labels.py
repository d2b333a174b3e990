"""Label files: a leading WordNet id is dropped (labels.WNID, the one definition of one)."""
from __future__ import annotations

import pytest
from conftest import shared

from cam_caffe.errors import ModelError
from cam_caffe.labels import WNID, read_labels


def test_imagenet_synset_words_lose_their_ids():
    path = shared("imagenet", "synset_words.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    labels = read_labels(path)
    assert len(labels) == len(lines) == 1000
    for line, label in zip(lines, labels, strict=True):     # "n01440764 tench, Tinca tinca"
        wnid, rest = line[:9], line[10:]
        assert line[9] == " " and WNID.fullmatch(wnid) and label == rest


def test_only_a_whole_leading_wordnet_id_is_dropped(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("n01440764 tench\n  n07930864\t cup  \n\nn0144076 seven digits\n"
                    "n014407640 nine digits\nn01440764\nlabel n01440764 inside\nplain\n",
                    encoding="utf-8")
    assert read_labels(path) == ["tench", "cup", "n0144076 seven digits",
                                 "n014407640 nine digits", "n01440764",
                                 "label n01440764 inside", "plain"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ModelError, match="labels file is empty"):
        read_labels(path)
