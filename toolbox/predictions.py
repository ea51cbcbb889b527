"""--predict's machinery: the images to classify (files, and folders walked for image files), their checks, the
class names and prompt template that an adapters file records (or --classes), the output folder, the top-k lines
and predictions.csv; first `predict_images`, the command, which reads top to bottom. Nothing here imports train.py:
the functions of train.py it calls (the classifier, the logits, the adapters' layout) come in `ref`
(toolbox/orchestration.Reference).

predictions.csv has one row per image, in the order the images were found, and one column group per model:

    path,class_1,probability_1,...,class_k,probability_k[,zero_shot_class_1,zero_shot_probability_1,...]

`path` is absolute; class_1 is the top-1 class; probabilities are CLIP's softmax over all the classes (so the k
shown sum to at most 1), highest first. With --adapters and --zero-shot both, the unprefixed group is the trained
run's and the zero_shot_ group the frozen model's; with --zero-shot alone, the unprefixed group is the frozen
model's. predictions.json beside it records what produced them (model, its activation, adapters, classes, template).
"""

import csv
import io
import os
from pathlib import Path

import clip_min
import data
import orthcr
from toolbox import cli, files, imagefolder, images, runs, settings

# what a folder is searched for: ImageFolder's extensions, as for a folder of your own images (a file named on the
# command line is taken whatever its suffix: the image checks say whether it is one)
IMAGE_SUFFIXES = imagefolder.IMAGE_EXTENSIONS
TOP_K = 5  # classes shown per image (fewer when there are fewer classes)
CSV_NAME, RECORD_NAME = "predictions.csv", "predictions.json"
ZERO_SHOT = "zero_shot_"  # the column prefix of the frozen model's group beside a trained run's


# ---------------------------------------------------------------------------------------------------- the command

def predict_images(args, ref):
    """--predict: images classified by a trained run (its adapters file) and/or the frozen model (--zero-shot),
    among the classes the adapters were trained on (or --classes), with their prompt template. The top-k per image
    printed and written to predictions.csv. The adapters file and the flags that must agree with it, the classes,
    every image, the output folder and the base model's SHA-256 are checked before the model is loaded."""
    adapters_file = runs.read_adapters_once(args.adapters, ref.settings) if args.adapters else None
    if adapters_file:
        check_activation(args.activation, args.adapters, adapters_file["settings"])
    cfg = ref.settings.record(args, adapters_file["settings"] if adapters_file else None)
    classnames, template = recorded_classes(args.adapters, adapters_file["saved"]) if adapters_file \
        else (None, data.PHOTO)
    template = args.template or template
    classnames = read_classes(cfg.classes) if cfg.classes else classnames
    if classnames is None:
        runs.fail(f"{args.adapters} records no class names (written before they were recorded): name the classes "
                  f"with --classes NAME... or --classes FILE")
    classes = data.Dataset("--classes" if cfg.classes else "the adapters' classes", classnames, template)
    cli.check_prompts(cfg, {0: (None, {"predict": classes})})
    paths = find_images(cfg.predict)
    check_images(paths)
    folder = output_folder(cfg.out, cfg.adapters)
    check_output(folder, cfg.overwrite)
    model, params, cfg = _base_model(cfg, args, adapters_file, ref)
    models = {}  # column prefix -> (weights, CoOp context)
    if adapters_file:
        adapters, context, _ = runs.read_adapters_file(cfg.adapters, adapters_file, params,
                                                       *ref.init_trainables(params, cfg, 0), cfg.device)
        models[""] = (orthcr.export_state_dict(params, adapters, ref.cayley_transform(cfg.neumann)), context)
    if cfg.zero_shot:
        models[ZERO_SHOT if adapters_file else ""] = (params, None)
    results = classify(model, models, classes, paths, cfg, ref)
    record = {"adapters": str(Path(cfg.adapters).resolve()) if cfg.adapters else None,
              "adapters_sha256": adapters_file["sha256"] if adapters_file else None, "model": runs.model_label(cfg),
              "checkpoint_sha256": cfg.checkpoint_sha256, "activation": cfg.activation, "classnames": classnames,
              "template": template, "prompt": cfg.prompt if adapters_file else "fixed", "zero_shot": cfg.zero_shot}
    write(folder, paths, results, classnames, record)
    runs.say(f"predictions of {len(paths)} image{'s' * (len(paths) > 1)} written to {folder / CSV_NAME}")
    return results


def classify(model, models, classes, paths, cfg, ref):
    """{column prefix: each image's top-k [(class index, probability)]} for each of `models` (prefix -> (weights,
    CoOp context)), in batches with CLIP's test preprocessing; each image's lines printed as its batch is done."""
    features = {prefix: ref.classifier(model, weights, context, classes, cfg)
                for prefix, (weights, context) in models.items()}
    results, done = {prefix: [] for prefix in models}, 0
    batches = data.eval_batches([items(paths)], cfg.eval_batch_size, cfg.workers, model.visual.input_resolution,
                                *ref.mean_std(model))
    try:
        for _, batch, _ in batches:
            for prefix, (weights, _) in models.items():
                logits = ref.class_logits(model, weights, batch.to(cfg.device), features[prefix], cfg)
                results[prefix] += top_k(logits, cfg.top_k)
            for n in range(done, done + len(batch)):
                for prefix in models:
                    print(line(paths[n], results[prefix][n], classes.classnames, "zero-shot " if prefix else ""))
            done += len(batch)
    except data.DataError as e:  # an image that changed on disk since it was checked
        runs.fail(str(e))
    return results


def check_activation(given, path, recorded):
    """--activation, where given, is the one the adapters file `path` records (`recorded`: its settings): another
    would classify with a model the adapters were not trained on. One line, before anything is loaded."""
    trained = recorded.get("activation")
    if given is not None and trained is not None and given != trained:
        runs.fail(f"--activation {given} contradicts {path}, trained with activation = {trained}: --predict "
                  f"classifies with the model the adapters were trained on; drop --activation")


def _base_model(cfg, args, adapters_file, ref):
    """(model, params, cfg) of the base model: --weights or --model if given, else the one the adapters file
    records (an OpenAI name, or a path), its SHA-256 checked against the file's record."""
    recorded = (adapters_file["saved"].get("config") or {}).get("model") if adapters_file else None
    source = args.weights or args.model or recorded or cfg.model
    if source not in clip_min.MODELS:
        if not Path(source).expanduser().is_file():
            runs.fail(f"{cfg.adapters} were trained on {source}, which is not a file here: pass that model with "
                      f"--weights FILE (its SHA-256 is checked)")
        cfg = settings.replace(cfg, weights=source)
    else:
        cfg = settings.replace(cfg, model=source, weights=None)
    if args.activation is None and "activation" not in (adapters_file["settings"] if adapters_file else {}):
        cfg = settings.replace(cfg, activation=ref.model_activation(cfg.weights))  # the recorded model's config
    try:
        path, model_sha256 = clip_min.checkpoint(cfg.weights or cfg.model, cfg.download_root)
        cfg = settings.replace(cfg, checkpoint_sha256=model_sha256)
        if adapters_file:
            cli.check_evaluation(cfg, adapters_file["settings"])
        cli.check_layout(cfg, ref.init_trainables, path)
        runs.say(f"loading {runs.model_label(cfg)} ({files.format_size(path.stat().st_size)})")
        model = clip_min.load(str(path), cfg.device, activation=cfg.activation)
    except (ValueError, RuntimeError, OSError) as e:
        runs.fail(str(e).splitlines()[0] if str(e) else repr(e))
    model.requires_grad_(False)
    return model, dict(model.state_dict()), cfg


# ---------------------------------------------------------------------------------------------------- the images

def find_images(paths):
    """The image files named by `paths`: files as given, folders walked (sorted, dot-files and symlinked folders
    skipped) for files with an image suffix; each once, absolute. One line for a missing path or an empty folder."""
    found = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            found.append(os.path.abspath(path))
        elif path.is_dir():
            inside = _walk(path)
            if not inside:
                runs.fail(f"--predict {given}: no image files in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            found += inside
        else:
            what = "not a regular file" if os.path.lexists(path) else "no such file or folder"
            runs.fail(f"--predict {given}: {what}")
    return list(dict.fromkeys(found))


def _walk(folder):
    found = []
    for top, dirs, names in os.walk(folder):  # os.walk does not follow symlinked folders: a link loop cannot recurse
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.abspath(os.path.join(top, name)) for name in sorted(names)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(top, name))]
    return found


def check_images(paths):
    """Every image is a regular, decodable, not cut short image that CLIP's preprocessing can take (the checks
    data.load_image applies): one line naming the bad ones, before any model is loaded."""
    bad = images.find_problems(paths, "images to classify")
    if bad:
        listing = "; ".join(f"{p} {msg}" for p, msg in bad[:5])
        runs.fail(f"--predict: {len(bad)} of {len(paths):,} images cannot be classified: {listing}"
                  f"{'; ...' if len(bad) > 5 else ''}")


def items(paths):
    """The images as data.Items (label unused), for data.eval_batches: CLIP's test preprocessing, in batches."""
    return [data.Item(p, 0, "") for p in paths]


# ---------------------------------------------------------------------------------------------------- the classes

def read_classes(values):
    """--classes NAME... or --classes FILE (one class per line, blank lines skipped): the class names, each once."""
    if len(values) == 1 and Path(values[0]).expanduser().is_file():
        try:
            text = files.read_bounded(Path(values[0]).expanduser(), imagefolder.CLASSNAMES_LIMIT, "--classes file")
            names = [line.strip() for line in text.decode("utf-8").splitlines()]
        except (OSError, UnicodeDecodeError, ValueError) as e:
            runs.fail(f"--classes {values[0]}: cannot read it as UTF-8 text: {e}")
        names, source = [n for n in names if n], f"--classes {values[0]}"
    else:
        names, source = [v.strip() for v in values], "--classes"
    if any(not n for n in names):
        runs.fail(f"{source}: a class name is empty")
    if len(names) < 2:
        runs.fail(f"{source}: {len(names)} class{'es' if len(names) != 1 else ''}; give at least two "
                  f"(with one, every image gets it with probability 1)")
    long = next((n for n in names if len(n) > imagefolder.NAME_LIMIT), None)
    if long is not None:
        runs.fail(f"{source}: a class name of {len(long):,} characters; CLIP's prompt holds 77 tokens")
    seen, repeated = set(), set()  # one pass: a long list must not take quadratic time
    for n in names:
        (repeated if n in seen else seen).add(n)
    repeated = sorted(repeated)
    if repeated:
        runs.fail(f"{source}: {', '.join(map(repr, repeated[:3]))} given more than once")
    pair = imagefolder.same_names(names)
    if pair:
        runs.fail(f"{source}: {names[pair[0]]!r} and {names[pair[1]]!r} are one name to CLIP's tokenizer, which "
                  f"ignores case and spacing: their prompts would be identical; give each class its own name")
    return names


def recorded_classes(path, saved):
    """(class names or None, template or None) that adapters file `path` (its content `saved`) records: the
    classes it was trained on (the base classes of a base-to-new run). Files written before these were recorded
    hold neither: the template then follows from the recorded dataset, the class names from --classes."""
    config = saved.get("config") or {}
    names, template = config.get("classnames"), config.get("template")
    if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        runs.fail(f"{path}: its recorded classnames are not a list of class names")
    if template is not None and not (isinstance(template, str) and "{}" in template):
        runs.fail(f"{path}: its recorded template {template!r} is not a prompt template with {{}}")
    if template is None:
        dataset = (saved.get("settings") or {}).get("data")
        template = data.DATASETS[dataset].template if dataset in data.DATASETS else None
    return names, template


# ---------------------------------------------------------------------------------------------------- the output

def output_folder(out, adapters):
    """--out, else predict_<n>/ beside the adapters file (runs/predict_<n>/ for --zero-shot alone), n the first
    number whose folder does not exist yet: a default never meets an earlier prediction."""
    if out:
        return Path(out).expanduser()
    parent = Path(adapters).resolve().parent if adapters else Path("runs")
    n = 1
    while os.path.lexists(parent / f"predict_{n}"):
        n += 1
    return parent / f"predict_{n}"


def check_output(folder, overwrite):
    """The folder can take predictions.csv and predictions.json: it is a folder, or can be made, and a file can be
    created in it (tried: a file made and removed, as are the folders made for it, so that nothing is left behind),
    and it holds neither file already (unless --overwrite)."""
    runs.check_writable(folder)
    for name in (CSV_NAME, RECORD_NAME):
        if os.path.lexists(folder / name) and not overwrite:
            runs.fail(f"{folder / name} exists: add --overwrite to replace it, or choose another --out")
        if (folder / name).is_dir():
            runs.fail(f"{folder / name} is a folder")
    try:
        created = files.make_dirs(folder)
    except OSError as e:
        runs.fail(f"--out {folder}: cannot create it ({e.strerror or e})")
    probe = folder / f".{CSV_NAME}.{os.urandom(4).hex()}.tmp"  # the name files.write_atomic will write first
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
        problem = None
    except OSError as e:  # a read-only file system, or permission bits that root's os.access does not see
        problem = e.strerror or str(e)
    finally:
        files.remove_empty_dirs(created)
    if problem:
        runs.fail(f"--out {folder}: cannot write a file there ({problem})")


def top_k(logits, k):
    """[(class index, probability)] * k per image, highest first, from (N, C) logits: the classes ranked by their
    logits (the top-1 is their argmax, the evaluation's prediction), each with its softmax probability."""
    indices = logits.topk(min(k, logits.shape[1]), dim=1).indices
    values = logits.float().softmax(dim=1).gather(1, indices)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices.cpu(), values.cpu())]


def line(path, top, classnames, label=""):
    """One image's printed line: `path: class (0.912), class (0.051), ...`."""
    return f"{label}{path}: " + ", ".join(f"{classnames[i]} ({p:.3f})" for i, p in top)


def header(k, groups):
    return ["path"] + [f"{prefix}{column}_{j}" for prefix in groups for j in range(1, k + 1)
                       for column in ("class", "probability")]


def write(folder, paths, results, classnames, record):
    """predictions.csv and predictions.json, each through a temporary file renamed into place. `results` maps a
    column prefix ("" or ZERO_SHOT) to each image's top-k list."""
    k = len(next(iter(results.values()))[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header(k, list(results)))
    for n, path in enumerate(paths):
        row = [path]
        for top in results.values():
            for index, p in top[n]:
                row += [classnames[index], f"{p:.6f}"]
        writer.writerow(row)
    created = _make_folder(folder)
    try:
        runs.write_file(folder / CSV_NAME, lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))
        runs.write_json(folder / RECORD_NAME, {**record, "images": len(paths), "top_k": k, "columns": list(results)})
    except BaseException:
        if created:
            for name in (CSV_NAME, RECORD_NAME):
                (folder / name).unlink(missing_ok=True)
            files.remove_empty_dirs(created)
        raise


def _make_folder(folder):
    try:
        return files.make_dirs(folder)
    except OSError as e:
        runs.fail(f"cannot create {folder}: {e.strerror or e}")
