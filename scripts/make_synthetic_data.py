#!/usr/bin/env python
"""Generate the small synthetic AdvertiseGen-style data sets shipped in ``data/``.

Everything here is invented (attribute vocabulary, templates); no line of the real AdvertiseGen corpus is
used. The output is fully deterministic: running the script twice gives byte-identical files.

Writes (relative to ``--out``, default: the repository's ``data/``)::

    synthetic_adgen/train.json   2000 rows  {"content": "类型#裙*颜色#红色*...", "summary": "..."}
    synthetic_adgen/dev.json      200 rows
    synthetic_chat/train.json     200 rows  {"prompt": "...", "response": "...", "history": [[q, a], ...]}
    synthetic_chat/dev.json        40 rows

Usage::

    python scripts/make_synthetic_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240601
ADGEN_SIZES = {"train": 2000, "dev": 200}
CHAT_SIZES = {"train": 200, "dev": 40}
MIN_SUMMARY, MAX_SUMMARY = 30, 90
# The built-in model's tokenizer is character-level and ChatGLM2's prompt format adds 19 tokens around ``content``,
# so 45 characters is what fits the default dataset.max_source_length of 64: longer attribute lists are drawn again,
# and the built-in example cuts no prompt (it used to cut 5%, and warn of it on every run).
MAX_CONTENT = 45

# ---------------------------------------------------------------------------------------------------------
# Attribute vocabulary.
# ---------------------------------------------------------------------------------------------------------
VALUES: dict[str, list[str]] = {
    "材质": ["棉", "麻", "丝绸", "雪纺", "针织", "牛仔布", "羊毛", "蕾丝", "棉麻", "网纱", "灯芯绒", "皮革"],
    "颜色": [
        "红色",
        "白色",
        "黑色",
        "蓝色",
        "粉色",
        "绿色",
        "黄色",
        "灰色",
        "紫色",
        "米色",
        "卡其色",
        "藏青色",
    ],
    "风格": ["复古", "简约", "文艺", "甜美", "休闲", "优雅", "街头", "清新", "通勤", "学院"],
    "图案": ["格子", "条纹", "碎花", "波点", "纯色", "印花", "刺绣", "字母", "拼色", "几何"],
    "版型": ["宽松", "修身", "直筒", "A字", "收腰", "落肩"],
    "裙长": ["短裙", "中长裙", "长裙", "及膝裙", "连衣裙"],
    "衣长": ["短款", "常规款", "中长款", "长款"],
    "裤长": ["九分裤", "七分裤", "长裤", "短裤", "五分裤"],
    "领型": ["圆领", "V领", "翻领", "立领", "方领", "娃娃领", "一字领", "高领", "西装领"],
    "袖型": ["短袖", "长袖", "泡泡袖", "喇叭袖", "七分袖", "无袖", "灯笼袖"],
}

# Item type -> the attribute keys it may carry, in the order they appear in ``content``.
TYPE_KEYS: dict[str, list[str]] = {
    "裙": ["材质", "颜色", "风格", "图案", "版型", "裙长", "领型", "袖型"],
    "上衣": ["材质", "颜色", "风格", "图案", "版型", "衣长", "领型", "袖型"],
    "裤": ["材质", "颜色", "风格", "图案", "版型", "裤长"],
    "外套": ["材质", "颜色", "风格", "图案", "版型", "衣长", "领型"],
}
TYPE_WORD = {"裙": "裙子", "上衣": "上衣", "裤": "裤子", "外套": "外套"}

# Fixed phrasing per item type.
OPENINGS: dict[str, list[str]] = {
    "裙": ["这款裙子", "这条裙子", "这款美裙"],
    "上衣": ["这款上衣", "这件上衣", "这款时尚上衣"],
    "裤": ["这款裤子", "这条裤子", "这款休闲裤"],
    "外套": ["这款外套", "这件外套", "这款百搭外套"],
}
CLOSINGS: dict[str, list[str]] = {
    "裙": ["穿上它轻松展现女性的温柔魅力", "让你在夏日里美得与众不同", "约会出游都很合适"],
    "上衣": ["日常出街也能轻松驾驭", "是衣橱里不可缺少的单品", "搭配裙子或裤子都很好看"],
    "裤": ["让你在行走间尽显潇洒", "上班出游都能轻松驾驭", "搭配各种上衣都不会出错"],
    "外套": ["是春秋季节必备的单品", "保暖又不失时髦感", "让你轻松穿出个人风格"],
}
FILLERS = ["做工精致细节满满", "整体设计简洁大方", "穿着舒适自在", "性价比很高"]

# Clause templates per attribute key; ``{v}`` is the attribute value. No trailing punctuation.
CLAUSES: dict[str, list[str]] = {
    "材质": ["采用{v}面料", "选用舒适的{v}材质", "{v}面料柔软亲肤", "{v}材质手感细腻有质感"],
    "颜色": ["{v}的配色十分百搭", "经典的{v}低调又显白", "{v}的衣身衬托好气色", "以{v}为主色调"],
    "风格": ["走{v}风格路线", "散发出浓浓的{v}气息", "{v}的风格彰显独特品味", "带有{v}的味道"],
    "图案": ["{v}图案增加了层次感", "点缀{v}元素显得活泼有趣", "{v}的设计丰富了整体细节"],
    "版型": ["{v}的版型修饰身材", "{v}剪裁遮肉显瘦", "{v}版型不挑身材"],
    "裙长": ["{v}的长度恰到好处", "{v}的设计显得腿部更修长"],
    "衣长": ["{v}设计方便搭配各种下装", "{v}的长度刚刚好"],
    "裤长": ["{v}的设计拉长腿部线条", "{v}的长度显高显瘦"],
    "领型": ["{v}的设计修饰脸型", "精致的{v}凸显优雅气质", "{v}露出好看的颈部线条"],
    "袖型": ["{v}的设计灵活又时髦", "搭配{v}更显活力", "{v}设计遮住手臂的肉肉"],
}

# ---------------------------------------------------------------------------------------------------------
# Single-turn rows (content -> summary).
# ---------------------------------------------------------------------------------------------------------


def make_attributes(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """Pick an item type and 3-6 attributes for it (one key may repeat with a second 风格)."""
    item_type = rng.choice(sorted(TYPE_KEYS))
    keys = TYPE_KEYS[item_type]
    chosen = set(rng.sample(keys, rng.randint(3, min(6, len(keys)))))
    attrs: list[tuple[str, str]] = []
    for key in keys:
        if key not in chosen:
            continue
        if key == "风格" and rng.random() < 0.2:
            for value in rng.sample(VALUES[key], 2):
                attrs.append((key, value))
        else:
            attrs.append((key, rng.choice(VALUES[key])))
    return item_type, attrs


def format_content(item_type: str, attrs: list[tuple[str, str]]) -> str:
    return "*".join(f"{k}#{v}" for k, v in [("类型", item_type), *attrs])


def make_summary(rng: random.Random, item_type: str, attrs: list[tuple[str, str]]) -> str:
    """1-3 sentences of ad copy that reuse the attribute values, MIN_SUMMARY..MAX_SUMMARY characters."""
    clauses = []
    for key, value in attrs:
        # A repeated key (two 风格 values) never reuses the same template.
        options = [t for t in CLAUSES[key] if t.format(v="") not in "".join(clauses)] or CLAUSES[key]
        clauses.append(rng.choice(options).format(v=value))
    rng.shuffle(clauses)
    opening = rng.choice(OPENINGS[item_type])
    closing = rng.choice(CLOSINGS[item_type])
    fillers = list(FILLERS)
    rng.shuffle(fillers)
    n_sentences = rng.choice([1, 2, 2, 3])
    while True:
        # Split the clauses into up to three sentences; the closing phrase ends the last one.
        parts = [opening, *clauses, closing]
        k = max(1, min(n_sentences, len(parts) // 2))
        cuts = sorted(rng.sample(range(2, len(parts) - 1), k - 1)) if k > 1 else []
        sentences = ["，".join(parts[a:b]) + "。" for a, b in zip([0, *cuts], [*cuts, len(parts)], strict=True)]
        text = "".join(sentences)
        if len(text) > MAX_SUMMARY and len(clauses) > 1:
            clauses.pop()
        elif len(text) < MIN_SUMMARY and fillers:
            clauses.append(fillers.pop())
        else:
            return text


def make_adgen_rows(rng: random.Random, n: int, seen: set[str]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        item_type, attrs = make_attributes(rng)
        content = format_content(item_type, attrs)
        if content in seen or len(content) > MAX_CONTENT:
            continue
        seen.add(content)
        summary = make_summary(rng, item_type, attrs)
        assert MIN_SUMMARY <= len(summary) <= MAX_SUMMARY, summary
        rows.append({"content": content, "summary": summary})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Multi-turn rows (prompt/response/history).
# ---------------------------------------------------------------------------------------------------------
FIRST_ASKS = [
    "请根据以下商品属性写一段广告文案：{c}",
    "帮我为这件商品写一段广告语，属性如下：{c}",
    "商品属性：{c}。请写一段推广文案。",
]
SHORTEN_ASKS = ["能再短一点吗？", "太长了，精简一下。", "请写得简短一些。"]
COLOUR_ASKS = ["请在文案里突出一下颜色。", "能多提一下颜色吗？"]
TITLE_ASKS = ["给它起一个简短的标题。", "再帮我想一个标题。"]
TITLE_TAILS = ["美出新高度", "时尚又百搭", "穿出好心情", "轻松显气质"]


def shorten(text: str) -> str:
    """Keep the first sentence; if there is only one, keep its first clauses."""
    sentences = [s for s in text.split("。") if s]
    if len(sentences) > 1:
        return sentences[0] + "。"
    parts = sentences[0].split("，")
    return "，".join(parts[: max(2, len(parts) // 2)]) + "。"


def make_chat_row(rng: random.Random) -> dict:
    item_type, attrs = make_attributes(rng)
    content = format_content(item_type, attrs)
    summary = make_summary(rng, item_type, attrs)
    values = dict(attrs)
    word = TYPE_WORD[item_type]
    turns: list[list[str]] = [[rng.choice(FIRST_ASKS).format(c=content), summary]]
    follow_ups = ["shorten", "title"] + (["colour"] if "颜色" in values else [])
    rng.shuffle(follow_ups)
    for kind in follow_ups[: rng.randint(0, 2)]:
        last = turns[-1][1]
        if kind == "shorten":
            turns.append([rng.choice(SHORTEN_ASKS), shorten(last)])
        elif kind == "colour":
            colour = values["颜色"]
            answer = f"{colour}是这款{word}的一大亮点，衬得肤色格外白皙。" + shorten(summary)
            turns.append([rng.choice(COLOUR_ASKS), answer])
        else:
            lead = values.get("风格", "") + values.get("颜色", "")
            turns.append([rng.choice(TITLE_ASKS), f"{lead}{word}，{rng.choice(TITLE_TAILS)}"])
    prompt, response = turns[-1]
    return {"prompt": prompt, "response": response, "history": turns[:-1]}


# ---------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out: Path) -> list[Path]:
    """Write all synthetic files under ``out``; returns the paths written."""
    written = []
    rng = random.Random(SEED)
    seen: set[str] = set()  # train and dev never share a content string
    for split, n in ADGEN_SIZES.items():
        path = out / "synthetic_adgen" / f"{split}.json"
        write_jsonl(path, make_adgen_rows(rng, n, seen))
        written.append(path)
    rng = random.Random(SEED + 1)
    for split, n in CHAT_SIZES.items():
        path = out / "synthetic_chat" / f"{split}.json"
        write_jsonl(path, [make_chat_row(rng) for _ in range(n)])
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    default_out = Path(__file__).resolve().parent.parent / "data"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out, help=f"output directory (default: {default_out})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
