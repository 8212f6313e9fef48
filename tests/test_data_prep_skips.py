"""Every bad input is skipped with its own reason, never fatal, and accounted for in the ledger."""

from __future__ import annotations

import json

from data_prep_helpers import bomb_png, encode, ledger, manifest, photo, samples, shard, skips_by_at


def test_each_bad_input_has_its_reason(tmp_path):
    photo(64, 64, 1).save(tmp_path / "good.jpg")
    photo(64, 64, 2).save(tmp_path / "good2.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    jpeg = encode(photo(96, 64, 3))
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_text("a caption saved under the wrong name\n")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    photo(10, 10).save(tmp_path / "tiny.jpg")
    good = {"image": "good.jpg", "caption": "fine"}
    lines = [
        json.dumps(good),  # 1 written
        json.dumps({"image": "nowhere.jpg", "caption": "x"}),  # 2 missing file
        json.dumps({"image": "zero.jpg", "caption": "x"}),  # 3 zero bytes
        json.dumps({"image": "truncated.jpg", "caption": "x"}),  # 4 truncated JPEG
        json.dumps({"image": "text.jpg", "caption": "x"}),  # 5 text named .jpg
        json.dumps({"image": "bomb.png", "caption": "x"}),  # 6 decompression bomb
        json.dumps({"image": "tiny.jpg", "caption": "x"}),  # 7 below --min-side
        json.dumps({"image": "good2.jpg", "caption": " \t "}),  # 8 whitespace text
        '{"image": "good2.jpg", "caption": "unterminated',  # 9 malformed JSON
        json.dumps({"caption": "no image field"}),  # 10 missing field
        json.dumps({"image": "good2.jpg"}),  # 11 no text field
        json.dumps(good),  # 12 duplicate of line 1
        json.dumps({"image": "good2.jpg", "prompt": 42}),  # 13 wrong type
        json.dumps(
            {"image": "good2.jpg", "conversations": [{"from": "gpt", "value": "a"}]}
        ),  # 14 bad order
        json.dumps({"image": ["good.jpg", "good2.jpg"], "caption": "two"}),  # 15 two images
        "",  # blank: not a record
        "[1, 2]",  # 17 not an object
    ]
    data = (
        "\n".join(lines) + "\n"
    ).encode() + b'{"image": "good2.jpg", "caption": "caf\xe9"}\n'  # 18 Latin-1
    (tmp_path / "bad.jsonl").write_bytes(data)

    folder = tmp_path / "folder"
    folder.mkdir()
    photo(64, 64, 4).save(folder / "x.jpg")
    (folder / "x.txt").write_bytes("légende".encode("latin-1"))

    out = tmp_path / "out"
    shard([f"jsonl:{tmp_path / 'bad.jsonl'}", f"folder:{folder}"], out, workers=1)
    skips = skips_by_at(out)
    expected = {
        "line 2": "missing_image",
        "line 3": "empty_image",
        "line 4": "truncated_image",
        "line 5": "not_an_image",
        "line 6": "decompression_bomb",
        "line 7": "too_small",
        "line 8": "empty_text",
        "line 9": "bad_json",
        "line 10": "missing_field",
        "line 11": "missing_field",
        "line 12": "duplicate",
        "line 13": "invalid_field",
        "line 14": "bad_conversation",
        "line 15": "multiple_images",
        "line 17": "bad_json",
        "line 18": "bad_encoding",
        "x.jpg": "bad_encoding",
    }
    assert {at: e["reason"] for at, e in skips.items()} == expected
    assert "line 9" in skips["line 9"]["detail"]
    assert "line 1 " in skips["line 12"]["detail"] and skips["line 12"]["key"]
    assert "nowhere.jpg" in skips["line 2"]["detail"]

    # nothing lost: one ledger line per record, written ones are exactly the shard contents
    entries = ledger(out)
    assert len(entries) == 17 + 1
    written = {e["key"]: e["shard"] for e in entries if e["status"] == "written"}
    assert written == {key: s["shard"] for key, s in samples(out).items()}
    m = manifest(out)
    assert m["totals"]["records"] == len(entries) and m["totals"]["samples"] == 1
    assert sum(m["skipped"].values()) == len(expected) and m["skipped"]["missing_field"] == 2
    assert m["sources"]["bad"]["records"] == 17 and m["sources"]["folder"]["skipped"] == 1
