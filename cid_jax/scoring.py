"""Scoring: the paper's identity metrics over reference photos and generated images, and the
evaluation's inputs and outputs — the library under `cid_jax.evaluate` and training's evaluation.

Inputs: the prompt sets (`paper`, `reference`), a references folder (one photo per identity,
`class_words.json`), a generated folder (`<identity>/p<k>_s<seed>.png` or a `manifest.csv`).
`score` computes CLIP-T, CLIP-I, DINO, FaceSim, FGIS per image, their means and 95% intervals over
identities, FID and KID over the sets (the metric networks: `cid_jax.metrics`); `write_outputs`
writes report.md, metrics.json, per_image.csv and contact_sheet.png.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
import re
from typing import Optional

from cid_jax import errors, paths

log = logging.getLogger("cid_jax.scoring")

CLASS_WORD = "<class word>"
# The evaluation prompts of the paper's Table 2 (as its text gives them; `<class word>` is replaced
# per identity by 'man', 'woman', ...).
PAPER_PROMPTS = (
    "a <class word> wearing a red hat", "a <class word> wearing a santa hat",
    "a <class word> wearing a rainbow scarf", "a <class word> wearing a black top hat and a monocle",
    "a <class word> in a chef outfit", "a <class word> in a firefighter outfit", "a <class word> in a police outfit",
    "a <class word> wearing pink glasses", "a <class word> wearing a yellow shirt",
    "a <class word> in a purple wizard outfit", "a <class word> in the jungle", "a <class word> in the snow",
    "a <class word> on the beach", "a <class word> on a cobblestone street", "a <class word> on top of pink fabric",
    "a <class word> on top of a wooden floor", "a <class word> with a city in the background",
    "a <class word> with a mountain in the background", "a <class word> with a blue house in the background",
    "a <class word> with a purple rug in a forest", "a <class word> holding a glass of wine",
    "a <class word> riding a horse", "a <class word> holding a piece of cake", "a <class word> giving a lecture",
    "a <class word> reading a book", "a <class word> gardening in the backyard", "a <class word> cooking a meal",
    "a <class word> working out at the gym", "a <class word> walking the dog", "a <class word> baking cookies",
    "a <class word> wearing a doctoral cap", "a <class word> wearing a spacesuit",
    "a <class word> wearing sunglasses and necklace", "a <class word> coding in front of a computer",
    "a <class word> in a helmet and vest riding a motorcycle", "a painting of a <class word> in the style of Banksy",
)
# The reference repository's own protocol (evaluation/EvaluationIMGs_stars_prompts.csv): 15 identities
# x the same 45 prompts, each with its identity's class word. Kept verbatim, PhotoMaker's trigger
# word `img` included: the reference pipeline ignores its `trigger_word="img"` argument, so to
# ConsistentID `img` is an ordinary word of the prompt, exactly as the reference's scores saw it.
REFERENCE_PROMPTS = (
    "a <class word> wearing a red hat",
    "a <class word> wearing a santa hat",
    "a <class word> wearing a rainbow scarf",
    "a <class word> wearing a black top hat and a monocle",
    "a <class word> in a chef outfit",
    "a <class word> in a firefighter outfit",
    "a <class word> in a police outfit",
    "a <class word> wearing pink glasses",
    "a <class word> wearing a yellow shirt",
    "a <class word> in a purple wizard outfit",
    "a painting of a <class word> in the style of Banksy",
    "a painting of a <class word> in the style of Vincent Van Gogh",
    "a colorful graffiti painting of a <class word>",
    "a watercolor painting of a <class word>",
    "a Greek marble sculpture of a <class word>",
    "a street art mural of a <class word>",
    "a black and white photograph of a <class word>",
    "a pointillism painting of a <class word>",
    "a Japanese woodblock print of a <class word>",
    "a street art stencil of a <class word>",
    "a <class word> img riding a horse",
    "a <class word> img holding a glass of wine",
    "a <class word> img holding a piece of cake",
    "a <class word> img giving a lecture",
    "a <class word> img reading a book",
    "a <class word> img gardening in the backyard",
    "a <class word> img cooking a meal",
    "a <class word> img working out at the gym",
    "a <class word> img walking the dog",
    "a <class word> img baking cookies",
    "a <class word> img wearing a doctoral cap",
    "a <class word> img wearing a spacesuit",
    "a <class word> img wearing sunglasses and necklace",
    "a <class word> coding in front of a computer",
    "a <class word> in a helmet and vest riding a motorcycle",
    "a <class word> in the jungle",
    "a <class word> in the snow",
    "a <class word> on the beach",
    "a <class word> on a cobblestone street",
    "a <class word> on top of pink fabric",
    "a <class word> on top of a wooden floor",
    "a <class word> with a city in the background",
    "a <class word> with a mountain in the background",
    "a <class word> with a blue house in the background",
    "a <class word> on top of a purple rug in a forest",
)
# The sheet's identities (its image file names without .png) and their class words.
REFERENCE_CLASS_WORDS = {
    "albert_einstein": "man", "andrew_ng": "man", "barack_obama": "man", "dwayne_johnson": "man",
    "elon_mask": "man", "feifei_li": "woman", "geoffrey_hinton": "man", "joe_biden": "man",
    "kamala_harris": "woman", "kaming_he": "man", "lecun_yann": "man", "michelle_obama": "woman",
    "sam_altman": "man", "scarlett_johansson": "woman", "taylor_swift": "woman",
}
PROMPT_SETS = {"paper": PAPER_PROMPTS, "reference": REFERENCE_PROMPTS}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
GENERATED_NAME = re.compile(r"^p(\d+)_s(-?\d+)$")


# ------------------------------------------------------------------------------------ inputs


def read_prompts(spec: Optional[str]) -> Optional[list[str]]:
    if not spec:
        return None
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    from cid_jax import inference

    if not paths.path(spec).is_file():
        raise errors.MissingError(f"--prompts={spec}: not {' or '.join(map(repr, PROMPT_SETS))} and no such file")
    return inference.read_prompts_file(spec, flag="--prompts")


def read_references(folder: str) -> dict[str, pathlib.Path]:
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise errors.MissingError(f"--references={folder} is not a folder of photos")
    refs = {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    if not refs:
        raise errors.InputError(f"--references={folder} holds no photo ({', '.join(IMAGE_EXTS)})")
    return refs


def class_words(references_dir, prompts_spec: Optional[str] = None) -> dict[str, str]:
    """{identity: class word}: the references folder's `class_words.json`, over (with
    `--prompts=reference`) the reference sheet's own table."""
    base = dict(REFERENCE_CLASS_WORDS) if prompts_spec == "reference" else {}
    path = pathlib.Path(references_dir).expanduser() / "class_words.json"
    if not path.is_file():
        return base
    try:
        words = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InputError(f"{path} is not valid JSON ({e}); write {{\"identity\": \"class word\", ...}}") from None
    if not isinstance(words, dict) or not all(isinstance(v, str) for v in words.values()):
        raise errors.InputError(f"{path} must map each identity to its class word: {{\"identity\": \"woman\", ...}}")
    return {**base, **words}


def fill(prompt: str, word: str) -> str:
    return prompt.replace(CLASS_WORD, word)


@dataclasses.dataclass
class Generated:
    path: pathlib.Path
    reference: str
    prompt: Optional[str]
    seed: Optional[int] = None


def read_manifest(manifest: pathlib.Path) -> list[Generated]:
    """The rows of a --generated folder's manifest.csv (columns image, reference; prompt, seed optional)."""
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("image", "reference") if c not in (reader.fieldnames or [])]
            if missing:
                raise errors.InputError(f"{manifest} has no {' or '.join(missing)} column (columns: image, reference, "
                                        "prompt, seed)")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise errors.InputError(f"{manifest} is not a UTF-8 CSV file ({e.reason})") from None
    out = []
    for line, r in enumerate(rows, start=2):
        seed = (r.get("seed") or "").strip()
        if seed and not seed.lstrip("-").isdigit():
            raise errors.InputError(f"{manifest} line {line}: seed={seed!r} is not an integer")
        if not r.get("image"):
            raise errors.InputError(f"{manifest} line {line}: no image")
        out.append(Generated(manifest.parent / r["image"], r["reference"], r.get("prompt") or None,
                             int(seed) if seed else None))
    return out


def read_generated(folder: str, references: dict, prompts: Optional[list[str]], words: dict,
                   default_word: str) -> list[Generated]:
    """The images of a --generated folder (see the module docstring), each with its reference and prompt."""
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise errors.MissingError(f"--generated={folder} is not a folder")
    manifest = root / "manifest.csv"
    if manifest.is_file():
        out = read_manifest(manifest)
    else:
        out = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for image in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTS):
                m = GENERATED_NAME.match(image.stem)
                prompt = None
                if m and prompts is not None and int(m.group(1)) < len(prompts):
                    prompt = fill(prompts[int(m.group(1))], words.get(sub.name, default_word))
                out.append(Generated(image, sub.name, prompt, int(m.group(2)) if m else None))
    unknown = sorted({g.reference for g in out} - set(references))
    if unknown:
        raise errors.InputError(f"--generated images of identities with no reference photo: {unknown[:10]}")
    if not out:
        raise errors.InputError(f"--generated={folder} holds no image")
    return out


# ------------------------------------------------------------------------------------ scoring


def score(models, references: dict, generated: list[Generated], timing: Optional[dict]) -> tuple[dict, list]:
    """(metrics.json content, per-image rows)."""
    from cid_jax import inference
    from cid_jax import metrics

    rows, scored = [], []
    ref_images = {name: inference.read_image(str(p)) for name, p in references.items()}
    for name in references:
        mine = [g for g in generated if g.reference == name]
        if not mine:
            continue
        ref = metrics.describe_reference(models, name, ref_images[name])
        images = [inference.read_image(str(g.path)) for g in mine]
        for g, scores in zip(mine, metrics.score_images(models, ref, images, [g.prompt for g in mine])):
            rows.append({"image": g.path.as_posix(), "reference": name, "prompt": g.prompt or "", "seed": g.seed,
                         **scores})
            scored.append((name, scores))
    result = metrics.per_identity(scored)
    if models.inception is not None:
        gen_feats = models.inception([inference.read_image(str(g.path)) for g in generated])
        ref_feats = models.inception(list(ref_images.values()))
        result["fid"] = {"value": metrics.fid(gen_feats, ref_feats), "generated": len(gen_feats),
                         "references": len(ref_feats)}
        result["kid"] = {"value": metrics.kid(gen_feats, ref_feats), "generated": len(gen_feats),
                         "references": len(ref_feats)}
    if "facesim" in result:
        result["facesim"]["no_face"] = int(sum(bool(r.get("no_face")) for r in rows))
    if "fgis" in result:  # no facial region parsed in a generated image: scored 0, counted as FaceSim counts
        result["fgis"]["no_face"] = int(sum(r.get("fgis_regions") == 0 for r in rows))
    result["s_per_image"] = ({"value": timing["s_per_image"], "compile_s": timing["compile_s"]}
                             if timing else {"skipped": "images made elsewhere (--generated)"})
    if any(g.prompt is None for g in generated) and "clip_t" not in result:
        result["clip_t"] = {"skipped": "the images' prompts are unknown (--prompts, or a manifest.csv)"}
    for m, flag in models.skipped().items():
        result.setdefault(m, {"skipped": f"needs {flag}"})
    return {m: result[m] for m in metrics_order(result)}, rows


def metrics_order(result) -> list[str]:
    from cid_jax.metrics import METRICS

    return [m for m in METRICS if m in result] + [m for m in result if m not in METRICS]


# ------------------------------------------------------------------------------------ outputs


def _cell(entry: dict, scale: float = 100.0, digits: int = 1) -> str:
    if "skipped" in entry:
        return "skipped"
    if "value" in entry:
        return f"{entry['value']:.{digits + 2}g}" if scale == 1 else f"{entry['value'] * scale:.{digits}f}"
    return f"{entry['mean'] * scale:.{digits}f}"


def report_markdown(result: dict, name: str, n_images: int, n_refs: int) -> str:
    cols = [("CLIP-T ↑", "clip_t", 100), ("CLIP-I ↑", "clip_i", 100), ("DINO ↑", "dino", 100),
            ("FaceSim ↑", "facesim", 100), ("FGIS ↑", "fgis", 100), ("FID ↓", "fid", 1), ("KID ↓", "kid", 1),
            ("Speed (s)", "s_per_image", 1)]
    lines = [f"# Identity fidelity: {name}", "",
             f"{n_images} generated images of {n_refs} identities. Cosines x 100, as the paper's Table 3; "
             "95% intervals over identities below the table.", "",
             "| method | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(_cell(result[m], s) for _, m, s in cols) + " |", ""]
    for _, m, _ in cols:
        e = result[m]
        if "ci95" in e:
            lo, hi = e["ci95"]
            lines.append(f"- {m}: {100 * e['mean']:.2f} (95% interval {100 * lo:.2f} .. {100 * hi:.2f}, "
                         f"{e['identities']} identities)" + (f"; {e['no_face']} images without a detectable face "
                                                             "scored 0" if "no_face" in e else ""))
        elif "skipped" in e:
            lines.append(f"- {m}: skipped ({e['skipped']})")
    if "compile_s" in result.get("s_per_image", {}):
        lines.append(f"- compile: {result['s_per_image']['compile_s']:.1f} s (not in the speed column)")
    return "\n".join(lines) + "\n"


def contact_sheet(references: dict, generated: list[Generated], path: pathlib.Path, tile: int = 128,
                  per_row: int = 8) -> None:
    from PIL import Image, ImageDraw

    from cid_jax import inference

    names = [n for n in references if any(g.reference == n for g in generated)]
    sheet = Image.new("RGB", (tile * (per_row + 1), tile * len(names)), "white")
    for r, name in enumerate(names):
        images = [references[name]] + [g.path for g in generated if g.reference == name][:per_row]
        for c, p in enumerate(images):
            thumb = Image.fromarray(inference.read_image(str(p)))
            thumb.thumbnail((tile, tile))
            sheet.paste(thumb, (c * tile, r * tile))
        ImageDraw.Draw(sheet).text((4, r * tile + 4), name, fill=(255, 255, 0))
    sheet.save(path)


def finite_or_null(value):
    """`value` with every NaN/inf float as None: JSON has no NaN (an interval of one identity is NaN)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(out: pathlib.Path, result: dict, rows: list, references, generated, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(finite_or_null(result), indent=1, allow_nan=False))
    (out / "report.md").write_text(report_markdown(result, name, len(generated), len(references)))
    keys = ["image", "reference", "prompt", "seed", "clip_t", "clip_i", "dino", "facesim", "fgis",
            "fgis_regions", "no_face"]
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    contact_sheet(references, generated, out / "contact_sheet.png")
