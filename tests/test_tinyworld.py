"""The synthetic world: upstream formats and layout, determinism, label balance, train/eval disjointness, truth
of BISON captions and NLVR2 labels against the scene records, and the reference SparklesEval judge.

Facts are re-checked here with small independent parsers of the world's sentences, not with the generator's
own helpers, so a bug in the generator cannot vouch for itself.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from sparkles.tinyworld import build_world, iter_world_texts, judge_reference, load_scenes, main
from sparkles.tinyworld.build import WorldConfig
from sparkles.conversation.template import IMAGE_MARKER as SLOT
from sparkles.eval.benchmarks.bison import prompt as bison_prompt
from sparkles.eval.benchmarks.nlvr2 import prompt as nlvr2_prompt

WORDS = {"no": 0, "a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
         "eight": 8}
PHRASES = {"at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2), "on the left": (1, 0),
           "in the centre": (1, 1), "on the right": (1, 2), "at the bottom left": (2, 0), "at the bottom": (2, 1),
           "at the bottom right": (2, 2)}
SPLITS = {"CC": [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 4)], "VG": [(1, 2), (1, 3), (2, 3), (2, 4)]}
NAME_RE = re.compile(r"IMAGE#([0-9A-Za-z_-]+)")


def _generate(root: Path, *extra: str) -> None:
    assert main(["--out", str(root), "--seed", "7", "--preset", "ci", "--no-tokenizer", "--quiet",
                 "--workers", "1", *extra]) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    _generate(root, "--reasoning-mix", "caption=1")  # the single-image caption checks are off by default
    return root


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _dialogues(root: Path, subset: str) -> list:
    return _load(root / f"data/SparklesDialogue{subset}/annotations/SparklesDialogue{subset}.json")


def _eval(root: Path, name: str) -> list:
    return _load(root / f"evaluation/{name}/annotations/sparkles_evaluation_{name.lower()}_annotations.json")


def _scenes(root: Path) -> dict:
    return {str(r["image_id"]): r for r in _load(root / "world/scenes.json")["scenes"]}


def _kinds(rec) -> Counter:
    return Counter((o["colour"], o["shape"]) for o in rec["objects"])


def _count(rec, colour=None, shape=None) -> int:
    return sum(1 for o in rec["objects"]
               if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape))


# --- files, fields, determinism -------------------------------------------------------------------

def test_same_seed_gives_identical_files(tmp_path):
    small = ["--num-train", "30", "--num-bison", "4", "--num-nlvr2", "4", "--num-sparkleseval", "4"]
    _generate(tmp_path / "a", *small)
    _generate(tmp_path / "b", *small)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert sum(p.suffix == ".json" for p in files_a) >= 15
    for rel in files_a:  # JSON and images alike
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert main(["--out", str(tmp_path / "c"), "--seed", "8", "--preset", "ci", "--no-tokenizer", "--quiet",
                 "--workers", "1", *small]) == 0
    cc = "data/SparklesDialogueCC/annotations/SparklesDialogueCC.json"
    assert (tmp_path / "a" / cc).read_bytes() != (tmp_path / "c" / cc).read_bytes()


def test_refuses_to_overwrite_a_world_without_force(world, tmp_path, capsys):
    assert main(["--out", str(world), "--preset", "ci", "--no-tokenizer", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--num-train", "3", "--no-tokenizer", "--quiet"]) == 2
    assert "num_train" in capsys.readouterr().err


def test_force_replaces_a_world_and_removes_its_stale_images(tmp_path):
    small = ["--num-train", "12", "--num-bison", "2", "--num-nlvr2", "2", "--num-sparkleseval", "2"]
    _generate(tmp_path, *small)
    assert main(["--out", str(tmp_path), "--seed", "9", "--preset", "ci", "--no-tokenizer", "--quiet",
                 "--workers", "1", "--force", *small]) == 0
    caption_dir = tmp_path / "data" / "cc_sbu_align" / "image"
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
               if p.suffix in (".jpg", ".png") and p.parent != caption_dir and "I4" not in p.parts}
    scenes = load_scenes(tmp_path).values()
    assert on_disk == {r["file"] for r in scenes}
    # The caption set links exactly the training images of the new world.
    train_ids = {str(r["image_id"]) for r in scenes if r["dataset"] in ("CC", "VG")}
    assert {p.stem for p in caption_dir.glob("*.jpg")} == train_ids


def test_caption_set_uses_training_images_with_their_descriptions(world):
    import json

    scenes = load_scenes(world)
    ann = json.loads((world / "data" / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert ann and all(scenes[a["image_id"]]["dataset"] in ("CC", "VG") for a in ann)
    assert all(a["caption"] == scenes[a["image_id"]]["description"] for a in ann)
    assert all((world / "data" / "cc_sbu_align" / "image" / f"{a['image_id']}.jpg").is_file() for a in ann)


def test_perception_questions_are_true_and_use_training_images(world):
    samples = _load(world / "data" / "cc_sbu_align" / "perception.json")
    scenes = _scenes(world)
    train_ids = {k for k, r in scenes.items() if r["dataset"] in ("CC", "VG")}
    assert len(samples) >= 2 * len(train_ids)  # a one-image and a two-image count question for every image
    kinds = Counter()
    for s in samples:
        ids = [img["image_id"] for img in s["tgt_imgs"]]
        assert set(ids) <= train_ids and NAME_RE.findall(s["uniform_question"])[:len(ids)] == ids
        assert s["instruction"] == f"###Human: {s['uniform_question']}###Assistant: "
        assert (world / "data" / "cc_sbu_align" / "image" / f"{ids[0]}.jpg").is_file()
        count = re.fullmatch(r"How many (?:(\w+) )?(circle|square|triangle|object)s? are there in .*", s["uniform_question"])
        if count:
            colour, shape = count.group(1), None if count.group(2) == "object" else count.group(2)
            facts = re.findall(r"IMAGE#(\w+) shows (\w+) ", s["answer"])
            assert [k for k, _ in facts] == ids
            for key, word in facts:
                assert WORDS[word] == _count(scenes[key], colour, shape), (s, key)
            kinds[f"count{len(ids)}"] += 1
            kinds["present"] += any(WORDS[w] > 0 for _, w in facts)
        else:
            place = re.fullmatch(r"In IMAGE#(\w+) the (\w+) (\w+) is (.+)\.", s["answer"])
            assert place, s
            (obj,) = [o for o in scenes[place.group(1)]["objects"]
                      if (o["colour"], o["shape"]) == (place.group(2), place.group(3))]
            assert PHRASES[place.group(4)] == (obj["row"], obj["col"])
            kinds["where"] += 1
    assert kinds["count1"] == kinds["count2"] == len(train_ids) and kinds["where"] > 0
    assert 0.3 < kinds["present"] / (2 * len(train_ids)) < 0.8  # "no" is not the usual answer


def test_place_question_split_is_the_place_questions_of_the_perception_set(world):
    base = world / "data" / "cc_sbu_align"
    places = _load(base / "perception_where.json")
    expected = [s for s in _load(base / "perception.json") if " the " in s["answer"] and " is " in s["answer"]
                and re.fullmatch(r"(?:Look at .*\. )?Where is the \w+ \w+ in IMAGE#\w+(?:<Img><ImageHere></Img>)?\?",
                                 s["uniform_question"])]
    assert places == expected and len(places) > 50


def _check_holds(check: str) -> tuple[bool, str]:
    """A check "two red circles on the left: two at the top, no" read back: whether its stated count and place
    make the item hold, and its written yes/no."""
    item, fact_and_verdict = check.split(": ")
    fact, verdict = fact_and_verdict.rsplit(", ", 1)
    place = next((p for p in sorted(PHRASES, key=len, reverse=True) if item.endswith(" " + p)), None)
    stated_count, _, stated_place = fact.partition(" ")
    holds = WORDS[item.split()[0]] == WORDS[stated_count] and (place is None or stated_place == place)
    return holds, verdict


def test_reasoning_drills_are_text_only_evaluation_questions_with_consistent_verdicts(world):
    pairs = _load(world / "data" / "reasoning" / "reasoning.json")
    singles = _load(world / "data" / "reasoning" / "caption_checks.json")  # in a file of their own
    samples = pairs + singles
    assert len(samples) == 600  # the ci preset's num_reasoning
    assert all("true of IMAGE#" in s["uniform_question"] for s in singles)
    assert not any("true of IMAGE#" in s["uniform_question"] for s in pairs)
    kinds, labels, targets = Counter(), Counter(), Counter()
    for s in samples:
        assert s["tgt_imgs"] == [] and "<Img>" not in s["uniform_question"]
        assert s["instruction"] == f"###Human: {s['uniform_question']}###Assistant: "
        verdict = s["answer"].rsplit(" ", 1)[1].rstrip(".")
        caption = re.search(r"caption that describes exactly one of them: '(.*)'\.", s["uniform_question"])
        single = re.fullmatch(r"Is the caption '(.*)' true of (IMAGE#[12])\? Reason step by step and answer TRUE or "
                              r"FALSE\.", s["uniform_question"])
        if caption:  # the BISON question with its image slots removed; the choice is the image with no "no"
            assert s["uniform_question"] == bison_prompt(caption.group(1)).replace(SLOT, "")
            sections = re.findall(r"In (IMAGE#[12]): ([^.]*)\.", s["answer"])
            assert [name for name, checks in sections if ", no" not in checks] == [verdict]
            kind = "bison"
        elif single:  # one image's checks of a caption that places one item; the verdict follows from them alone
            text, name = single.groups()
            (section,) = re.findall(r"In (IMAGE#[12]): ([^.]*)\. So the caption is (TRUE|FALSE)\.$", s["answer"])
            assert section[0] == name and section[2] == verdict
            checks = [_check_holds(c) for c in section[1].split("; ")]
            assert all((v == "yes") == holds for holds, v in checks)
            assert (verdict == "TRUE") == all(holds for holds, _ in checks)
            assert len(re.findall("|".join(sorted(PHRASES, key=len, reverse=True)), text)) == 1  # one placed item
            assert len(checks) == len(re.split(", | and ", text))
            kind = "caption"
            targets[name] += 1
        else:
            statement = re.search(r"Is this statement about the pair true: '(.*)'\?", s["uniform_question"])
            assert s["uniform_question"] == nlvr2_prompt(statement.group(1)).replace(SLOT, "")
            assert verdict in ("TRUE", "FALSE")
            kind = "nlvr2"
        kinds[kind] += 1
        labels[kind, verdict] += 1
    assert kinds["bison"] == kinds["nlvr2"] == kinds["caption"] == 200
    assert all(50 < n < 150 for n in labels.values()) and len(labels) == 6  # both options of every kind occur
    assert all(n > 60 for n in targets.values()) and len(targets) == 2  # checks of IMAGE#1 and of IMAGE#2


def test_reasoning_drills_mark_their_facts_and_only_those_as_unsupervised(world):
    from sparkles.tinyworld.tasks import parse_fact

    samples = _load(world / "data" / "reasoning" / "reasoning.json") + \
        _load(world / "data" / "reasoning" / "caption_checks.json")
    for s in samples:
        answer, spans = s["answer"], s["unsupervised_spans"]
        facts = [answer[a:b] for a, b in spans]
        checks = [c for _, section in re.findall(r"In (IMAGE#[12]): ([^.]*)\.", answer) for c in section.split("; ")]
        if checks:  # a BISON check's fact sits between its item and its yes/no
            assert len(facts) == len(checks)
            assert all(f"{fact}, " in check for fact, check in zip(facts, checks))
            assert all(parse_fact(fact) is not None for fact in facts)
        else:  # an NLVR2 count: "IMAGE#1 shows two red circles"
            assert len(facts) == answer.count(" shows ") > 0
            assert all(re.fullmatch(r"(no|zero|one|two|three|four|five|six) [a-z ]+", fact) for fact in facts)
        rest = "".join(answer[b:a] for (_, b), (a, _) in zip([(0, 0)] + spans, spans + [(len(answer), 0)]))
        assert rest.endswith(answer.rsplit(" ", 1)[1]) and ("yes" in rest or "no" in rest)  # verdicts stay


def test_dialogue_files_have_upstream_fields_and_types(world):
    scenes = _scenes(world)
    for subset, id_type in (("CC", str), ("VG", int)):
        records = _dialogues(world, subset)
        assert len(records) == 150
        for rec in records:
            assert set(rec) == {"dialogue", "raw"} and set(rec["raw"][0]) == {"prompt", "response"}
            msgs = rec["dialogue"]
            assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
            for m in msgs:
                assert set(m) == ({"role", "content", "images"} if m["role"] == "user" else {"role", "content"})
            for img in msgs[0]["images"] + msgs[2]["images"]:
                assert set(img) == {"image_id", "caption"} and type(img["image_id"]) is id_type
                assert img["caption"] == scenes[str(img["image_id"])]["caption"]
                path = world / f"data/SparklesDialogue{subset}/images/{img['image_id']}.jpg"
                assert path.is_file(), path


def test_split_files_match_the_dialogues(world):
    for subset, splits in SPLITS.items():
        dialogues = _dialogues(world, subset)
        expected = {key: [] for key in splits}
        for rec in dialogues:
            q1, a1, q2, a2 = rec["dialogue"]
            n1, n2 = len(q1["images"]), len(q1["images"]) + len(q2["images"])
            expected[(1, n1)].append({"uniform_question": q1["content"],
                                      "instruction": f"###Human: {q1['content']}###Assistant: ",
                                      "answer": a1["content"], "tgt_imgs": q1["images"]})
            expected[(2, n2)].append({"uniform_question": q2["content"],
                                      "instruction": f"###Human: {q1['content']}###Assistant: {a1['content']}"
                                                     f"###Human: {q2['content']}###Assistant: ",
                                      "answer": a2["content"], "tgt_imgs": q1["images"] + q2["images"]})
        names = sorted(p.name for p in (world / f"data/SparklesDialogue{subset}/annotations").glob("*_turn*"))
        assert names == sorted(f"SparklesDialogue{subset}_turn{t}_{n}img.json" for t, n in splits)
        for (turn, n), samples in expected.items():
            written = _load(world / f"data/SparklesDialogue{subset}/annotations/"
                                    f"SparklesDialogue{subset}_turn{turn}_{n}img.json")
            assert written and written == samples
            for s in written:
                assert len(s["tgt_imgs"]) == n == s["instruction"].count(SLOT)


def test_evaluation_files_and_images(world):
    se = _eval(world, "SparklesEval")
    assert len(se) == 20 and [x["evaluation_id"] for x in se] == list(range(20))
    for x in se:
        assert set(x) == {"evaluation_id", "dialogue"}
        for m in (x["dialogue"][0], x["dialogue"][2]):
            for img in m["images"]:
                assert type(img["image_id"]) is int
                assert (world / f"evaluation/SparklesEval/images/{img['image_id']}.jpg").is_file()
    for x in _eval(world, "BISON"):
        assert {"evaluation_id", "caption", "true_image_id", "image_candidates"} <= set(x)
        assert len(x["image_candidates"]) == 2
        assert x["true_image_id"] in [c["image_id"] for c in x["image_candidates"]]
        for c in x["image_candidates"]:
            assert set(c) == {"image_id", "image_filename"} and type(c["image_id"]) is int
            assert c["image_filename"] == f"COCO_val2014_{c['image_id']:012d}.jpg"
            assert (world / "evaluation/BISON/images" / c["image_filename"]).is_file()
    for x in _eval(world, "NLVR2"):
        assert set(x) == {"evaluation_id", "identifier", "sentence", "label"}
        assert re.fullmatch(r"dev-\d+-\d+-\d+", x["identifier"]) and x["label"] in ("True", "False")
        for side in (0, 1):
            assert (world / f"evaluation/NLVR2/images/{x['identifier'][:-2]}-img{side}.png").is_file()


def test_scene_records_cover_every_image(world):
    from PIL import Image

    scenes = load_scenes(world)
    assert scenes == _scenes(world)
    on_disk = {p.relative_to(world).as_posix() for p in world.rglob("*")
               if p.suffix in (".jpg", ".png") and "cc_sbu_align" not in p.parts and "I4" not in p.parts}
    assert on_disk == {r["file"] for r in scenes.values()}
    for rec in list(scenes.values())[:50]:
        assert 1 <= len(rec["objects"]) <= 4
        with Image.open(world / rec["file"]) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        load_scenes(world / "nowhere")


def test_objects_are_visible_at_64_pixels(world):
    from PIL import Image

    from sparkles.tinyworld.render import object_geometry
    from sparkles.tinyworld.scenes import COLOUR_RGB, Obj

    checked = 0
    for rec in list(_scenes(world).values())[:150]:
        with Image.open(world / rec["file"]) as im:
            small = im.convert("RGB").resize((64, 64), Image.BICUBIC)
        for o in rec["objects"]:
            cx, cy, _r = object_geometry(Obj(o["shape"], o["colour"], o["size"], o["row"], o["col"],
                                             tuple(o["jitter"])), 64)
            pixel = small.getpixel((int(cx), int(cy + 1)))  # +1: a triangle's centroid sits low
            nearest = min(COLOUR_RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOUR_RGB[c], pixel)))
            assert nearest == o["colour"], (rec["file"], o, pixel)
            checked += 1
    assert checked > 200


# --- dialogue conventions -------------------------------------------------------------------------

def _all_dialogues(root: Path):
    for subset in ("CC", "VG"):
        for rec in _dialogues(root, subset):
            yield rec["dialogue"]
    for x in _eval(root, "SparklesEval") + _load(root / "evaluation/DemoChat/annotations/demo_chats.json"):
        yield x["dialogue"]


def test_image_mentions_follow_the_upstream_convention(world):
    for msgs in _all_dialogues(world):
        q1, a1, q2, a2 = msgs
        assert len(q2["images"]) == 1, q2  # turn 2 adds exactly one image
        defined: dict[str, object] = {}
        for m in msgs:
            text = m["content"]
            if m["role"] == "user":
                slot_names = re.findall(r"IMAGE#([0-9A-Za-z_-]+)<Img><ImageHere></Img>", text)
                assert text.count(SLOT) == len(slot_names) == len(m["images"])
                new = dict(zip(slot_names, (img["image_id"] for img in m["images"])))
            else:
                new = {}
            for match in NAME_RE.finditer(text):
                name, followed = match[1], text.startswith(SLOT, match.end())
                # The slot comes with the first mention of an image, and only then.
                assert followed == (name not in defined and name in new), text
                if followed:
                    defined[name] = new[name]
                assert name in defined, (text, defined)
        earlier = set(NAME_RE.findall(q1["content"]))
        assert set(NAME_RE.findall(q2["content"])) & earlier  # turn 2 refers back to a first-turn image
        # Named by id (the evaluation prompts' IMAGE#1/IMAGE#2 aside), or all by order of appearance as in the demo.
        by_order = [str(k) for k in range(1, len(defined) + 1)]
        assert (list(defined) == by_order
                or all(name == str(image_id) or (name in ("1", "2") and "IMAGE#1" + SLOT in q1["content"])
                       for name, image_id in defined.items())), defined


def test_answers_are_short(world):
    from sparkles.tinyworld.build import WorldConfig
    from sparkles.tinyworld.scenes import Scene
    from sparkles.tinyworld.tasks import Task, answer

    limit = WorldConfig().max_answer_words
    assert limit <= 60
    for msgs in _all_dialogues(world):
        for m in (msgs[1], msgs[3]):
            assert 1 <= len(m["content"].split()) <= limit, m["content"]
    # The answers a model should give on the benchmarks are as short.
    scenes = {k: Scene.from_record(r) for k, r in _scenes(world).items()}
    names = {"a": "IMAGE#1", "b": "IMAGE#2"}
    for x in _eval(world, "BISON"):
        pair = {"a": scenes[str(x["image_candidates"][0]["image_id"])],
                "b": scenes[str(x["image_candidates"][1]["image_id"])]}
        assert len(answer(Task("bison", ("a", "b"), text=x["caption"]), pair, names).split()) <= limit
    for x in _eval(world, "NLVR2"):
        stem = x["identifier"][:-2]
        pair = {"a": scenes[f"{stem}-img0"], "b": scenes[f"{stem}-img1"]}
        assert len(answer(Task("nlvr2", ("a", "b"), text=x["sentence"]), pair, names).split()) <= limit


def test_training_uses_the_evaluation_templates(world):
    kinds = Counter()
    for subset in ("CC", "VG"):
        for rec in _dialogues(world, subset):
            q1, a1 = rec["dialogue"][0], rec["dialogue"][1]
            m = re.search(r"'(.+?)'[.?] ", q1["content"])
            if m and q1["content"] == bison_prompt(m[1]):
                kinds[subset, "bison"] += 1
                check = r"[a-z ]+: [a-z ]+, (?:yes|no)"  # item: what the image holds of its kind, verdict
                section = rf"In IMAGE#{{n}}: {check}(?:; {check})*\. "
                assert re.fullmatch(r"Let's think step by step\. " + section.format(n=1) + section.format(n=2) +
                                    r"Therefore, the answer \(IMAGE#1 or IMAGE#2\) is IMAGE#[12]\.", a1["content"])
            elif m and q1["content"] == nlvr2_prompt(m[1]):
                kinds[subset, "nlvr2"] += 1
                needs = r"; the statement needs [a-z ]+: (?:yes|no)\. "  # each step judged, BISON-style
                side = r"The (?:left|right) image, IMAGE#[12], shows [^.;]+"
                assert re.fullmatch(r"Let's think step by step\. "
                                    rf"(IMAGE#1 shows [^.;]+{needs}IMAGE#2 shows [^.;]+{needs}"
                                    rf"|IMAGE#1 shows [^.;]+\. IMAGE#2 shows [^.;]+\. That makes [^.;]+ in total{needs}"
                                    rf"|{side}{needs}"
                                    rf"|{side}\. {side}\. [A-Z][a-z]+ is more than [a-z]+: (?:yes|no)\. )"
                                    r"Therefore, the answer \(TRUE or FALSE\) is (TRUE|FALSE)\.", a1["content"])
    for subset in ("CC", "VG"):
        assert kinds[subset, "bison"] >= 20 and kinds[subset, "nlvr2"] >= 20, kinds


# --- labels, disjointness, truth --------------------------------------------------------------------

def test_labels_are_balanced(world):
    bison = _eval(world, "BISON")
    first = sum(x["true_image_id"] == x["image_candidates"][0]["image_id"] for x in bison)
    assert abs(first - len(bison) / 2) <= 1
    nlvr2 = _eval(world, "NLVR2")
    assert abs(sum(x["label"] == "True" for x in nlvr2) - len(nlvr2) / 2) <= 1
    train = Counter()
    for subset in ("CC", "VG"):
        for rec in _dialogues(world, subset):
            m = re.search(r"is (IMAGE#[12]|TRUE|FALSE)\.$", rec["dialogue"][1]["content"])
            if m:
                train[m[1]] += 1
    assert 0.3 < train["IMAGE#1"] / (train["IMAGE#1"] + train["IMAGE#2"]) < 0.7
    assert 0.3 < train["TRUE"] / (train["TRUE"] + train["FALSE"]) < 0.7


def test_train_and_evaluation_scenes_are_disjoint(world):
    scenes = _scenes(world)
    signature = lambda rec: tuple(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"])  # noqa: E731
                                         for o in rec["objects"]))
    train = {k for k, r in scenes.items() if r["dataset"] in ("CC", "VG")}
    evaluation = {k for k, r in scenes.items() if r["dataset"] in ("SparklesEval", "BISON", "NLVR2", "DemoChat")}
    assert train and evaluation and not train & evaluation and len(train | evaluation) == len(scenes)
    assert not {signature(scenes[k]) for k in train} & {signature(scenes[k]) for k in evaluation}


def _caption_fits(caption: str, rec) -> bool:
    """Independent reading of a BISON caption: exact kinds and counts, and the stated position."""
    want: Counter = Counter()
    positions = []
    for part in re.split(r", | and ", caption):
        m = re.fullmatch(r"(\w+) (\w+) (circle|square|triangle)s?(?: (.+))?", part)
        assert m, part
        want[(m[2], m[3])] += WORDS[m[1]]
        if m[4]:
            positions.append((m[2], m[3], PHRASES[m[4]]))
    if _kinds(rec) != want:
        return False
    return all([(o["row"], o["col"]) for o in rec["objects"] if (o["colour"], o["shape"]) == (c, s)] == [cell]
               for c, s, cell in positions)


def _item_holds(part: str, rec) -> bool:
    """Independent reading of one caption item: the exact count of its kind, and its cell if one is stated."""
    m = re.fullmatch(r"(\w+) (\w+) (circle|square|triangle)s?(?: (.+))?", part)
    assert m, part
    cells = [(o["row"], o["col"]) for o in rec["objects"] if (o["colour"], o["shape"]) == (m[2], m[3])]
    return len(cells) == WORDS[m[1]] and (not m[4] or cells == [PHRASES[m[4]]])


def _item_fact(part: str, rec) -> str:
    """Independent statement of what a scene holds of a caption item's kind: its count in words ("zero" for
    none), and for a positioned item held once, where that one is."""
    m = re.fullmatch(r"(\w+) (\w+) (circle|square|triangle)s?(?: (.+))?", part)
    cells = [(o["row"], o["col"]) for o in rec["objects"] if (o["colour"], o["shape"]) == (m[2], m[3])]
    words = {n: w for w, n in WORDS.items() if w not in ("a", "no")} | {0: "zero"}
    fact = words[len(cells)]
    if m[4] and len(cells) == 1:
        fact += " " + {cell: phrase for phrase, cell in PHRASES.items()}[cells[0]]
    return fact


def test_bison_pairs_differ_in_one_attribute_and_the_caption_decides(world):
    scenes = _scenes(world)
    seen = Counter()
    for x in _eval(world, "BISON"):
        a, b = (scenes[str(c["image_id"])] for c in x["image_candidates"])
        objs = lambda r: Counter((o["shape"], o["colour"], o["size"], o["row"], o["col"])  # noqa: E731
                                 for o in r["objects"])
        only_a, only_b = objs(a) - objs(b), objs(b) - objs(a)
        if sum(only_a.values()) + sum(only_b.values()) == 1:
            kind = "count"
        else:
            assert sum(only_a.values()) == sum(only_b.values()) == 1, x
            (oa,), (ob,) = only_a, only_b
            changed = [name for name, i in (("shape", 0), ("colour", 1), ("size", 2)) if oa[i] != ob[i]]
            changed += ["position"] if oa[3:] != ob[3:] else []
            assert len(changed) == 1, (x, oa, ob)
            kind = changed[0]
        assert kind == x["difference"]
        seen[kind] += 1
        fits = [_caption_fits(x["caption"], scenes[str(c["image_id"])]) for c in x["image_candidates"]]
        true_index = [c["image_id"] for c in x["image_candidates"]].index(x["true_image_id"])
        assert fits == [i == true_index for i in range(2)], x
        # Some item of the caption is false of the decoy (it is not merely a less complete description).
        decoy = scenes[str(x["image_candidates"][1 - true_index]["image_id"])]
        assert not all(_item_holds(part, decoy) for part in re.split(r", | and ", x["caption"])), x
    assert set(seen) == {"colour", "shape", "count", "position"}


def _statement_truth(sentence: str, left, right) -> bool:
    """Independent reading of the NLVR2 statement templates."""
    def noun(text):
        m = re.fullmatch(r"(?:(red|green|blue|yellow|purple) )?(circle|square|triangle|object)s?", text)
        assert m, text
        return m[1], (None if m[2] == "object" else m[2])

    side = lambda s: (left, right) if s == "left" else (right, left)  # noqa: E731
    if m := re.fullmatch(r"There (?:is|are) exactly (\w+) (.+) in total\.", sentence):
        return _count(left, *noun(m[2])) + _count(right, *noun(m[2])) == WORDS[m[1]]
    if m := re.fullmatch(r"Both images contain a (\w+) (\w+)\.", sentence):
        return _count(left, m[1], m[2]) > 0 and _count(right, m[1], m[2]) > 0
    if m := re.fullmatch(r"The (left|right) image has more (.+) than the (?:left|right) image\.", sentence):
        mine, other = side(m[1])
        return _count(mine, *noun(m[2])) > _count(other, *noun(m[2]))
    if m := re.fullmatch(r"The (left|right) image contains a (\w+) (\w+)\.", sentence):
        return _count(side(m[1])[0], m[2], m[3]) > 0
    if m := re.fullmatch(r"The (left|right) image contains no (\w+) objects\.", sentence):
        return _count(side(m[1])[0], m[2]) == 0
    raise AssertionError(f"unknown statement {sentence!r}")


def test_nlvr2_labels_are_true_to_the_scenes(world):
    scenes = _scenes(world)
    for x in _eval(world, "NLVR2"):
        stem = x["identifier"][:-2]
        truth = _statement_truth(x["sentence"], scenes[f"{stem}-img0"], scenes[f"{stem}-img1"])
        assert x["label"] == ("True" if truth else "False"), x


def test_training_bison_and_nlvr2_answers_are_true(world):
    scenes = _scenes(world)
    checked = 0
    for subset in ("CC", "VG"):
        for rec in _dialogues(world, subset):
            q1, a1 = rec["dialogue"][0], rec["dialogue"][1]
            left, right = (scenes[str(i["image_id"])] for i in q1["images"][:2]) if len(q1["images"]) == 2 \
                else (None, None)
            m = re.search(r"'(.+?)'[.?] ", q1["content"])
            if m and q1["content"] == nlvr2_prompt(m[1]):
                assert a1["content"].endswith("TRUE." if _statement_truth(m[1], left, right) else "FALSE.")
                _assert_nlvr2_reasoning_true(a1["content"], m[1], left, right)
                checked += 1
            elif m and q1["content"] == bison_prompt(m[1]):
                fits = [_caption_fits(m[1], left), _caption_fits(m[1], right)]
                assert fits.count(True) == 1
                assert a1["content"].endswith(f"IMAGE#{fits.index(True) + 1}.")
                for n, scene in ((1, left), (2, right)):
                    section = re.search(rf"In IMAGE#{n}: ([^.]+)\.", a1["content"])[1]
                    checks = [re.fullmatch(r"(.+): (.+), (yes|no)", c).groups() for c in section.split("; ")]
                    assert [part for part, _, _ in checks] == re.split(r", | and ", m[1])
                    assert [fact for _, fact, _ in checks] == [_item_fact(p, scene) for p, _, _ in checks]
                    assert [verdict == "yes" for _, _, verdict in checks] == [_item_holds(p, scene)
                                                                             for p, _, _ in checks]
                checked += 1
    assert checked > 80


def _assert_nlvr2_reasoning_true(answer_text: str, sentence: str, left, right) -> None:
    """Every count the NLVR2 reasoning states is the scene's, every step's yes/no judges its count against the
    statement, and the verdict is TRUE exactly when no step says no."""
    stated = []
    for n, word, noun in re.findall(r"IMAGE#([12]),? shows (\w+) ([a-z ]+?)s?[.;]", answer_text):
        m = re.fullmatch(r"(?:(red|green|blue|yellow|purple) )?(circle|square|triangle|object)", noun)
        assert m, noun
        rec = left if n == "1" else right
        assert _count(rec, m[1], None if m[2] == "object" else m[2]) == WORDS[word], (answer_text, noun)
        stated.append(WORDS[word])
    values = {**WORDS, "no": 0, "zero": 0}
    judged = []
    for count, need, verdict in re.findall(r"shows (\w+) [^.;]+; the statement needs ([a-z ]+): (yes|no)\.",
                                           answer_text):
        expected = values[count] > 0 if need == "at least one" else values[count] == 0
        assert need in ("at least one", "none") and expected == (verdict == "yes"), answer_text
        judged.append(verdict)
    if m := re.search(r"(\w+) is more than (\w+): (yes|no)\.", answer_text):
        assert (values[m[1].lower()] > values[m[2]]) == (m[3] == "yes"), answer_text
        judged.append(m[3])
    if m := re.search(r"That makes (\w+) .+ in total; the statement needs (\w+): (yes|no)\.", answer_text):
        assert re.search(rf"exactly {m[2]} ", sentence), (answer_text, sentence)
        assert WORDS[m[1]] == sum(stated) and (m[1] == m[2]) == (m[3] == "yes"), answer_text
        judged.append(m[3])
    assert judged, answer_text
    assert answer_text.endswith("TRUE.") == ("no" not in judged), answer_text


# --- reference judge ------------------------------------------------------------------------------

def _mean_score(entry) -> float:
    return (sum(entry["A1_C123_scores"][1:]) + sum(entry["A2_C123_scores"][1:])) / 6


def _with_answers(dialogue, a1, a2):
    d = copy.deepcopy(dialogue)
    d[1]["content"], d[3]["content"] = a1, a2
    return d


def test_reference_judge_scores_reference_answers_high_and_wrong_ones_low(world):
    scenes = load_scenes(world)
    items = _eval(world, "SparklesEval")
    reference = [_mean_score(judge_reference(x["dialogue"], scenes)) for x in items]
    assert sum(reference) / len(reference) >= 9.0
    empty = [_mean_score(judge_reference(_with_answers(x["dialogue"], "", ""), scenes)) for x in items]
    assert max(empty) <= 2.0
    swap = {"no": "two", "one": "three", "two": "one", "three": "no", "a": "two"}
    miscount = lambda t: re.sub(r"\b(no|one|two|three|a)\b", lambda m: swap[m[1]], t)  # noqa: E731
    wrong = [_mean_score(judge_reference(_with_answers(x["dialogue"], miscount(x["dialogue"][1]["content"]),
                                                       miscount(x["dialogue"][3]["content"])), scenes))
             for x in items]
    assert sum(wrong) / len(wrong) < 7.0
    others = [_mean_score(judge_reference(_with_answers(x["dialogue"], y["dialogue"][1]["content"],
                                                        y["dialogue"][3]["content"]), scenes))
              for x, y in zip(items, items[1:] + items[:1])]
    assert sum(others) / len(others) < 5.0


def test_reference_judge_follows_the_upstream_judge_layout(world):
    scenes = load_scenes(world)
    entry = judge_reference(_eval(world, "SparklesEval")[0]["dialogue"], scenes)
    assert set(entry) == {"A1_C123_scores", "A2_C123_scores", "prompt", "response"}
    text = entry["response"]
    for turn in ("A1", "A2"):
        overall = re.findall(rf"rating of {turn} is \[*(\d+(?:\.\d+)?)", text)
        assert float(overall[0]) == entry[f"{turn}_C123_scores"][0]
        assert all(1.0 <= v <= 10.0 for v in entry[f"{turn}_C123_scores"])
    chunks = re.split(r"Evaluating [A-Za-z0-9]+", text)[1:]
    assert len(chunks) == 2
    for j in (1, 2, 3):
        values = [float(re.search(rf"\(C{j}\).*?Rating:\s*\[*(\d+(?:\.\d+)?)", c, re.DOTALL)[1]) for c in chunks]
        assert values == [entry["A1_C123_scores"][j], entry["A2_C123_scores"][j]]


def test_reference_judge_accepts_training_dialogues_too(world):
    scenes = load_scenes(world)
    scores = [_mean_score(judge_reference(rec["dialogue"], scenes)) for rec in _dialogues(world, "VG")[:60]]
    assert min(scores) >= 9.0


def test_reference_judge_reads_bison_checks_and_nlvr2_steps(world):
    from sparkles.tinyworld.judge import extract_claims

    scenes = load_scenes(world)
    flipped = {"yes": "no", "no": "yes"}
    seen = Counter()
    for subset in ("CC", "VG"):
        for rec in _dialogues(world, subset):
            dialogue = rec["dialogue"]
            a1 = dialogue[1]["content"]
            kind = "bison" if a1.count("In IMAGE#") == 2 else "nlvr2" if "(TRUE or FALSE)" in a1 else None
            if kind is None or seen[kind] >= 15:
                continue
            seen[kind] += 1
            names = {"1": "1", "2": "2"}
            claims = extract_claims(a1, names)
            assert claims.unparsed == 0 and claims.facts, a1
            right = judge_reference(dialogue, scenes)["A1_C123_scores"][1]
            assert right == 10.0, a1
            # Every check flipped (BISON) or every stated count changed (NLVR2): the image facts turn false
            # (a flipped positioned item keeps its true count part, hence "below 5", not 1).
            if kind == "bison":
                wrong_text = re.sub(r", (yes|no)\b", lambda m: ", " + flipped[m[1]], a1)
            else:
                wrong_text = re.sub(r"shows (no|one|two|three|four) ",
                                    lambda m: "shows " + ("one " if m[1] == "no" else "no "), a1)
            wrong = judge_reference(_with_answers(dialogue, wrong_text, dialogue[3]["content"]), scenes)
            assert wrong["A1_C123_scores"][1] < 5.0, wrong_text
    assert seen == {"bison": 15, "nlvr2": 15}


# --- tokenizer corpus and configuration -----------------------------------------------------------

def test_iter_world_texts_covers_what_the_model_sees(world):
    texts = list(iter_world_texts(world))
    assert all(isinstance(t, str) and t for t in texts)
    corpus = "\n".join(texts)
    assert bison_prompt(_eval(world, "BISON")[0]["caption"]) in corpus
    assert nlvr2_prompt(_eval(world, "NLVR2")[0]["sentence"]) in corpus
    for rec in _dialogues(world, "CC")[:20]:
        for m in rec["dialogue"]:
            assert m["content"] in corpus
    assert "###Human: " in corpus and "###Assistant: " in corpus


def test_mix_and_sizes_are_configurable():
    cfg = WorldConfig(seed=1, num_train=40, num_bison=4, num_nlvr2=4, num_sparkleseval=4,
                      mix={"describe": 1.0, "count": 0.0, "attribute": 0.0, "bison": 0.0, "nlvr2": 0.0})
    w = build_world(cfg)
    assert len(w.dialogues["CC"]) + len(w.dialogues["VG"]) == 40 and len(w.bison) == 4
    firsts = [rec["dialogue"][0]["content"] for s in ("CC", "VG") for rec in w.dialogues[s]]
    assert all(q.startswith("What do you see in ") for q in firsts)
    with pytest.raises(ValueError, match="unknown task kinds"):
        build_world(WorldConfig(mix={"poetry": 1.0}))
    # the drills: BISON and NLVR2 by default, the caption checks only when asked for
    default = build_world(WorldConfig(seed=1, num_train=40, num_bison=4, num_nlvr2=4, num_sparkleseval=4,
                                      num_reasoning=30)).reasoning
    assert Counter(it["kind"] for it in default) == {"bison": 15, "nlvr2": 15}
    mixed = build_world(WorldConfig(seed=1, num_train=40, num_bison=4, num_nlvr2=4, num_sparkleseval=4,
                                    num_reasoning=30, reasoning_mix={"bison": 1.0, "caption": 2.0})).reasoning
    assert Counter(it["kind"] for it in mixed) == {"bison": 10, "caption": 20}
    with pytest.raises(ValueError, match="unknown drill kinds"):
        build_world(WorldConfig(reasoning_mix={"riddle": 1.0}))
    with pytest.raises(SystemExit):  # the command line names the kinds it knows
        main(["--out", "unused", "--reasoning-mix", "riddle=1"])
