"""Loaders for the inputs of generation, with errors that name the file, record and field."""

from __future__ import annotations

from pathlib import Path


from sparkles.common.io import read_json

from .schema import check_dialogue_record


def load_cc_captions(path: str | Path) -> dict[str, dict]:
    """``filter_cap.json`` → ``{str id: {"image_id": str, "caption": str}}`` (CC ids are strings)."""
    data = read_json(path, what="cc_sbu_align caption file")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected an object with an 'annotations' list")
    pool: dict[str, dict] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and a text 'caption'")
        iid = str(ann["image_id"])
        pool[iid] = {"image_id": iid, "caption": ann["caption"]}
    return pool


def load_svit_descriptions(path: str | Path) -> dict[str, dict]:
    """SVIT ``detail_description.json`` → ``{str id: {"image_id": int, "caption": description}}``."""
    data = read_json(path, what="SVIT detailed-description file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")
    pool: dict[str, dict] = {}
    for i, item in enumerate(data):
        try:
            iid = int(item["image_id"])
            caption = item["conversations"][0]["content"][1]["value"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: record {i} lacks image_id or conversations[0].content[1].value "
                             f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(caption, str):
            raise ValueError(f"{path}: record {i} (image_id {iid}): the description is not text")
        pool[str(iid)] = {"image_id": iid, "caption": caption}
    return pool


def load_dialogues(path: str | Path, what: str) -> list[dict]:
    """A dialogue file in the released format (or a demo-seed file); every record is checked."""
    data = read_json(path, what=what)
    if not isinstance(data, list):
        raise ValueError(f"{what} {path}: expected a JSON list of dialogue records")
    for i, record in enumerate(data):
        check_dialogue_record(record, f"{path}: record {i}")
    return data


def image_ids_of(records: list[dict]) -> set[str]:
    """Every image id used in the user messages of ``records`` (as strings)."""
    return {str(img["image_id"]) for r in records for m in r["dialogue"] if m["role"] == "user"
            for img in m.get("images", [])}
