"""Each source kind (jsonl, llava, folder, hf) becomes the sample json of DESIGN §3."""

from __future__ import annotations

import json

import pytest

from data_prep.records import CAPTION_PROMPTS
from data_prep_helpers import (
    encode,
    ledger,
    manifest,
    photo,
    samples,
    shard,
    shard_cli,
    skips_by_at,
    write_jsonl,
)

USER, ASSISTANT = "user", "assistant"


def by_text(out) -> dict[str, dict]:
    """Sample json keyed by its last text (assistant answer or prompt)."""
    found = {}
    for s in samples(out).values():
        sample = s["json"]
        found[
            sample["prompt"] if sample["task"] == "t2i" else sample["messages"][-1]["content"]
        ] = sample
    return found


def user(text):
    return {"role": USER, "content": text}


def assistant(text):
    return {"role": ASSISTANT, "content": text}


def test_jsonl_field_kinds(tmp_path):
    for i in range(6):
        photo(64, 48, seed=i).save(tmp_path / f"{i}.jpg")
    parts = [{"type": "image"}, {"type": "text", "text": "What?"}]
    llava_turns = [
        {"from": "human", "value": "Colors?\n<image>"},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "More?"},
        {"from": "gpt", "value": "Green."},
    ]
    system = {"role": "system", "content": "Be brief."}
    src = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {
                "image": "0.jpg",
                "messages": [{"role": USER, "content": parts}, assistant("A gradient.")],
            },
            {"image": "1.jpg", "conversations": llava_turns},
            {"image": "2.jpg", "question": "Is it noisy?", "answer": "Yes."},
            {"image": "3.jpg", "prompt": "a noisy gradient"},
            {"image": "4.jpg", "caption": "  a plain caption  ", "meta": {"k": [1, 2]}},
            {"image": ["5.jpg"], "messages": [system, user("<image>"), assistant("Noise.")]},
        ],
    )
    shard(f"src=jsonl:{src}", tmp_path / "out", workers=1)
    got = by_text(tmp_path / "out")
    assert got["A gradient."]["messages"] == [user("<image>\nWhat?"), assistant("A gradient.")]
    assert got["Green."]["messages"] == [
        user("<image>\nColors?"),
        assistant("Blue."),
        user("More?"),
        assistant("Green."),
    ]
    assert got["Yes."]["messages"][0] == user("<image>\nIs it noisy?")
    assert got["a noisy gradient"] == {
        "task": "t2i",
        "prompt": "a noisy gradient",
        "source": "src",
        "width": 64,
        "height": 48,
    }
    caption = got["a plain caption"]
    assert caption["task"] == "i2t" and caption["meta"] == {"k": [1, 2]}
    assert caption["messages"][0]["content"] in {f"<image>\n{p}" for p in CAPTION_PROMPTS}
    assert got["Noise."]["messages"][:2] == [system, user("<image>")]
    assert {s["source"] for s in got.values()} == {"src"}
    assert manifest(tmp_path / "out")["totals"]["tasks"] == {"i2t": 5, "t2i": 1}


def test_caption_task_flag(tmp_path):
    photo(64, 64).save(tmp_path / "a.jpg")
    src = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "a caption"}])
    shard(f"jsonl:{src}", tmp_path / "out", task="t2i")
    (sample,) = by_text(tmp_path / "out").values()
    assert sample["task"] == "t2i" and sample["prompt"] == "a caption"


def test_llava(tmp_path):
    (tmp_path / "images" / "coco").mkdir(parents=True)
    photo(80, 64).save(tmp_path / "images" / "coco" / "1.jpg")
    data = tmp_path / "llava_mix.json"
    data.write_text(
        json.dumps(
            [
                {
                    "id": "000001",
                    "image": "coco/1.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A picture."},
                    ],
                },
                {
                    "id": "text-only",
                    "conversations": [
                        {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello"},
                    ],
                },
                "not an object",
            ]
        )
    )
    out = tmp_path / "out"
    shard(f"llava:{data}", out, image_root=tmp_path / "images")
    (sample,) = by_text(out).values()
    assert sample["messages"] == [user("<image>\nWhat is shown?"), assistant("A picture.")]
    assert sample["source"] == "llava_mix" and (sample["width"], sample["height"]) == (80, 64)
    skips = skips_by_at(out)
    assert skips["index 1 (id text-only)"]["reason"] == "missing_field"
    assert skips["index 2"]["reason"] == "bad_json"


def test_folder(tmp_path):
    root = tmp_path / "caps"
    (root / "sub").mkdir(parents=True)
    photo(64, 64, 1).save(root / "a.jpg")
    (root / "a.txt").write_text("caption a\n")
    photo(64, 64, 2).save(root / "sub" / "b.png")
    (root / "sub" / "b.json").write_text(json.dumps({"prompt": "prompt b"}))
    (root / "sub" / "b.txt").write_text("ignored: the json sidecar wins")
    photo(64, 64, 3).save(root / "c.webp")  # no sidecar
    (root / "orphan.txt").write_text("no image")
    (root / "notes.csv").write_text("not a record")
    out = tmp_path / "out"
    shard(f"folder:{root}", out)
    got = by_text(out)
    assert set(got) == {"caption a", "prompt b"}
    assert got["prompt b"]["task"] == "t2i" and got["caption a"]["task"] == "i2t"
    assert {s["ext"] for s in samples(out).values()} == {"jpg", "png"}
    skips = skips_by_at(out)
    assert skips["c.webp"]["reason"] == "missing_text"
    assert skips["orphan.txt"]["reason"] == "missing_image"
    assert len(ledger(out)) == 4


def _hf_dataset(tmp_path, n=3, split_names=None):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [{"bytes": encode(photo(64, 64, i)), "path": None} for i in range(n)],
        "caption": [f"hf caption {i}" for i in range(n)],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    if split_names:
        return datasets.DatasetDict({name: ds for name in split_names})
    return ds


def test_hf_save_to_disk(tmp_path):
    _hf_dataset(tmp_path).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    shard(f"web=hf:{tmp_path / 'ds'}", out)
    got = by_text(out)
    assert set(got) == {"hf caption 0", "hf caption 1", "hf caption 2"}
    assert {s["source"] for s in got.values()} == {"web"}
    assert sorted(e["at"] for e in ledger(out)) == ["row 0", "row 1", "row 2"]
    assert not (out / ".data_prep").exists()


def test_hf_dataset_dict_and_text_column(tmp_path):
    _hf_dataset(tmp_path, n=2, split_names=["train", "val"]).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"
    shard(f"hf:{tmp_path / 'dd'}", out, text_column="caption", task="t2i")
    assert sorted(e["at"] for e in ledger(out)) == [
        "train/row 0",
        "train/row 1",
        "val/row 0",
        "val/row 1",
    ]
    assert manifest(out)["totals"]["tasks"] == {"i2t": 0, "t2i": 4}


def test_hf_parquet_embedded_and_path_columns(tmp_path):
    import datasets

    _hf_dataset(tmp_path).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    photo(64, 64).save(tmp_path / "x.jpg")
    paths = datasets.Dataset.from_dict({"file": ["x.jpg"], "text": ["path caption"]})
    paths.to_parquet(str(tmp_path / "paths.parquet"))
    out = tmp_path / "out"
    shard(f"hf:{tmp_path / 'pq'}", out)
    assert len(samples(out)) == 3
    out2 = tmp_path / "out2"
    shard(f"hf:{tmp_path / 'paths.parquet'}", out2, image_column="file", image_root=tmp_path)
    assert set(by_text(out2)) == {"path caption"}


@pytest.mark.parametrize(
    "flag,message", [("--image-column", "is not a column"), ("--text-column", "no such column")]
)
def test_hf_bad_columns_are_command_errors(tmp_path, capsys, flag, message):
    _hf_dataset(tmp_path, n=1).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert shard_cli("--source", f"hf:{tmp_path / 'ds'}", "--output", out, flag, "nope") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
