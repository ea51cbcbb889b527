"""One home per setting: each is declared once (train.py's SETTINGS), and everything else is derived from that
declaration: the command line and its --help, the run's immutable record, the records a run writes and compares
(resume, --eval-only), the table label and run folder name, and docs/flags.md.

A new method flag is its `Setting(...)` line and the function that reads it: the parser, --help, the record, the
resume and eval-only comparisons, the adapters file and the flag table follow from the declaration.
"""

import argparse
import dataclasses
import math

import clip_min

ROLES = ("method", "data", "run")  # what a setting defines: the trained model, what it is trained/tested on, or
# only how this run goes (folders, devices, logging): the first two are compared on resume and recorded
EVAL_ONLY = (None, "file", "same", "trained", "checked")  # what --eval-only does with an adapters file's value:
# None: not recorded there; file: taken when the flag is not given (a given method flag must agree: only what
# the data is may be chosen anew); same: taken, and a given flag must agree;
# trained: always taken (only training reads it), a given flag must agree; checked: compared with the model


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its name (the record's field; the flag is --name-with-dashes), default, help and role.

    default: the value when the flag is not given, or a function of the other settings' values (`shown` then says
    it in words); check: the valid range, a function of a given value returning a problem or None; convert: turns
    the chosen value into the record's (`values` are all settings' chosen values); label: for a method setting, the
    words the table label (and run folder name) adds when it is not at its default."""
    name: str
    default: object
    help: str
    role: str = "run"
    group: str = ""
    type: object = None  # int, float, or None for text (or a function of the text that returns text)
    nargs: str | None = None
    choices: tuple | None = None
    metavar: str | None = None
    switch: bool = False  # a flag without value: given = not the default
    flag: str | None = None  # when not --name-with-dashes (False: a record field without a flag)
    shown: str | None = None  # the default as --help says it ({} stands for the declared default)
    check: object = None
    convert: object = None
    eval_only: str | None = None
    label: str | None = None
    nullable: bool = False  # None is one of its values even where its default is not None (ctx_init: random)

    def __post_init__(self):
        assert self.role in ROLES and self.eval_only in EVAL_ONLY, self

    @property
    def option(self):
        return self.flag if self.flag is not None else "--" + self.name.replace("_", "-")

    def default_text(self):
        """The default as --help and docs/flags.md show it ('' for a switch or none)."""
        if self.switch or (self.default is None and self.shown is None):
            return ""
        value = self.default
        plain = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return self.shown.replace("{}", plain) if self.shown is not None else plain

    def help_text(self):
        default = self.default_text()
        return self.help + (f" (default: {default})" if default else "")

    def valid(self, value):
        """Whether `value`, as a record holds it (lists for tuples), is one this setting can take."""
        if value is None:
            return self.default is None or self.nullable
        if self.nargs and not isinstance(value, list):
            return False
        for item in value if self.nargs else [value]:
            kind = bool if self.switch else self.type if self.type in (int, float) else str
            if kind is float and not (type(item) in (int, float) and math.isfinite(item)):
                return False
            if kind is not float and type(item) is not kind:
                return False
            if self.choices is not None and item not in self.choices or self.check and self.check(item):
                return False
        return True


# ---------------------------------------------------------------------------------------------------- checks
# a setting's range, as one problem line for a given flag value (None: fine). Every numeric setting has one, both
# ends, that follows from what it means (docs/reliability.md): a given value outside it is a flag error before
# anything is read or allocated, and a recorded value outside it (an adapters file's) is refused the same way.

FLOAT32_MAX = 3.4028234663852886e38
CONTEXT_LENGTH = min(c["context_length"] for c in clip_min.CONFIGS.values())  # CLIP's 77 text tokens
N_CTX_MAX = CONTEXT_LENGTH - 4  # CoOp's "[SOS] ctx_1..ctx_n {class}. [EOS]" around a one-token class name
IMAGE_MAX = max(c["image_resolution"] for c in clip_min.CONFIGS.values())  # 336 px: no model's image is larger
BLOCKS_MAX = max(4 * max(c["vision_width"], c["transformer_width"]) for c in clip_min.CONFIGS.values())  # 4096:
# a block is at least 1 x 1, and no layer of a CLIP model has more inputs (ViT-L/14's mlp.c_proj)
TEMPERATURE_MIN = math.ceil(2 / math.log(FLOAT32_MAX) * 1000) / 1000  # 0.023: cosines lie in [-1, 1], so
# similarity / T spans 2 / T, and exp(2 / T) must be finite in fp32 (2 / T < ln(3.4e38) = 88.7), even for a
# softmax that does not subtract the maximum first
STEPS_MAX = 10**9  # a step count no run reaches (three years at 10 steps/s): warm-up, checkpoints, logging


def between(low, high, why=""):
    """The range [low, high]; `why` says what the upper bound means (shown when it is passed). NaN is outside."""
    def check(value):
        if value is None:
            return None
        if not value >= low:
            return f"must be >= {low}, got {value}"
        if not value <= high:
            return f"must be <= {high:,}{f' ({why})' if why else ''}, got {value}"
    return check


def at_least(low):  # a lower bound alone: for a declaration whose values nothing bounds above
    def check(value):
        if value is not None and value < low:
            return f"must be >= {low}, got {value}"
    return check


def non_negative_number(value):
    if value is not None and not (value >= 0 and math.isfinite(value)):
        return f"must be a non-negative number, got {value}"


def positive_number(value):
    if value is not None and not (value > 0 and math.isfinite(value)):
        return f"must be a positive number, got {value}"


def learning_rate(value):
    if value is not None and not (0 < value <= 10):
        return (f"must be a positive number, at most 10 (AdamW moves each entry of P by about lr per step, and "
                f"entries of 1 already turn R by a right angle), got {value}")


def context_learning_rate(value):
    """--ctx-lr: CoOp's context trains with its own SGD (train.py's CTX_LR), not the rotations' AdamW."""
    if value is not None and not (0 < value <= 10):
        return (f"must be a positive number, at most 10 (the context's SGD moves it by lr x its gradient per step, "
                f"about 10 times that with momentum 0.9, and its vectors' entries are about 0.02; CoOp's lr is "
                f"0.002), got {value}")


def loss_weight(value):
    if value is not None and not (0 <= value <= 1000):
        return (f"must be a number from 0 to 1000 (a KL weighted 1000 times the cross-entropy leaves the labels "
                f"under 0.1 % of the loss), got {value}")


def temperature(value):
    if value is not None and not (TEMPERATURE_MIN <= value <= 1000):
        return (f"must be from {TEMPERATURE_MIN} to 1000: softmax(similarity / T) of cosines in [-1, 1] overflows "
                f"fp32 below {TEMPERATURE_MIN} (leave the flag out for the argmax), and above 1000 every patch is "
                f"as likely within 0.2 % (--cutout random), got {value}")


def momentum(value):
    if value is not None and not (0 <= value < 1):
        return f"must be in [0, 1), got {value}"


def seed(value):
    if not 0 <= value < 2**32:
        return f": {value} is not a seed (expected 0 <= seed < 2**32)"


SEEDS_MAX = 256  # each seed is a run folder whose .lock stays open to the end: well within 1024 file descriptors


MODEL_SETTINGS = ("activation",)  # settings of the base model, not of the adapters: they apply to zero-shot CLIP too


# ---------------------------------------------------------------------------------------------------- derived

FLAGS_INTRO = ("`python train.py --help` shows the same, grouped, with every default. A setting's role says what it "
               "defines: *method*, the trained model (compared when a run is resumed, recorded with its adapters); "
               "*data*, what it is trained and tested on (compared when a run is resumed); *run*, only how this "
               "run goes (folders, devices, logging).")


class Declarations(list):
    """The declared settings, in --help's order, and what is derived from them."""

    def __init__(self, settings):
        super().__init__(settings)
        names = [s.name for s in self]
        assert len(set(names)) == len(names), "a setting declared twice"
        self.by_name = {s.name: s for s in self}
        fields = [(s.name, object, dataclasses.field(default=None)) for s in self]
        self.Record = dataclasses.make_dataclass("Settings", fields, frozen=True)
        self.Record.declared = self  # every record knows its declarations

    # ------------------------------------------------------------------ the tables
    def flags(self):
        return [s for s in self if s.flag is not False]

    def names(self, role=None, eval_only=None):
        return tuple(s.name for s in self if (role is None or s.role in role)
                     and (eval_only is None or s.eval_only in eval_only))

    def result_names(self):
        """The settings that change what a run computes: a resumed run must match its checkpoint in each."""
        return self.names(role=("method", "data"))

    def training_only(self):
        """What only training reads: --eval-only takes it from the adapters file, never from flags."""
        return self.names(eval_only=("trained",))

    def saved_names(self):
        """What an adapters file records and --eval-only may read from it (each checked with Setting.valid)."""
        return self.names(eval_only=("file", "same", "trained", "checked"))

    def layout_names(self):
        """The adapters file's "config": the method settings that shape the trainable tensors and prompts."""
        return self.names(role=("method",), eval_only=("file", "same"))

    def unused(self, values):
        """The settings that do not apply to a run with these `values` (a dict of setting values, None where not
        given): with zero_shot, everything only training reads and the adapters' layout, since nothing is trained
        and no adapters exist. A given one is refused; the run's config.json leaves them all out."""
        if not values.get("zero_shot"):
            return ()
        # the base model's own settings (its activation) still apply: zero-shot CLIP computes with them
        return self.training_only() + tuple(n for n in self.layout_names() if n not in MODEL_SETTINGS)

    # ------------------------------------------------------------------ the command line
    def parser(self, parser):
        """Every flag into `parser` (an argparse.ArgumentParser), grouped as declared, each default None: a flag
        not given stays None, and `record` fills in the declared default."""
        groups = {}
        for s in self.flags():
            if s.group not in groups:
                groups[s.group] = parser.add_argument_group(s.group)
            kwargs = dict(dest=s.name, default=None, help=s.help_text().replace("%", "%%"))
            if s.switch:
                kwargs["action"] = "store_false" if s.default else "store_true"
            else:
                kwargs.update(type=s.type, nargs=s.nargs, metavar=s.metavar,
                              choices=list(s.choices) if s.choices is not None else None)
            groups[s.group].add_argument(s.option, **kwargs)
        return parser

    def range_problems(self, args):
        """Each given value outside its setting's range, one line each."""
        bad = []
        for s in self.flags():
            value = getattr(args, s.name, None)
            for item in (value if s.nargs and value is not None else [value]):
                problem = s.check(item) if s.check and item is not None else None
                if problem:
                    bad.append(f"{s.option} {problem}" if not problem.startswith(":") else f"{s.option}{problem}")
        return bad

    def record(self, args, saved=None, **known):
        """The run's immutable record from the parsed flags (None: not given). With --eval-only, a flag that was
        not given takes the value recorded in the adapters file (`saved`), as PEFT reads adapter_config.json, and
        the training settings are always the file's; else the declared default."""
        saved, values = saved or {}, {}
        for s in self:
            given = getattr(args, s.name, None) if s.flag is not False else known.get(s.name)
            recorded = saved.get("seed" if s.name == "seeds" else s.name)
            if s.eval_only == "trained" and getattr(args, "eval_only", None) and s.name in saved:
                given = recorded
            elif given is None and s.eval_only in ("file", "same") and recorded is not None:
                given = recorded if not s.nargs or isinstance(recorded, list) else [recorded]
            values[s.name] = given
        for s in self:  # the defaults, some of which depend on other settings' values
            if values[s.name] is None:
                values[s.name] = s.default(values) if callable(s.default) else s.default
        for s in self:
            value = values[s.name]
            value = tuple(map(positive_zero, value)) if isinstance(value, (list, tuple)) else positive_zero(value)
            values[s.name] = s.convert(value, values) if s.convert else value
        return self.Record(**values)

    # ------------------------------------------------------------------ the docs
    def flags_doc(self, title="Every flag of train.py", intro=FLAGS_INTRO):
        """docs/flags.md: every flag, grouped as --help groups them, with its default and its help."""
        lines = [f"# {title}", "", intro, "", "<!-- generated from train.py's SETTINGS by `make docs`; "
                 "tests/test_settings.py checks that it is current -->", "",
                 "| flag | default | role | what it does |", "|---|---|---|---|"]
        group = None
        for s in self.flags():
            if s.group != group:
                group = s.group
                lines.append(f"| **{group}** | | | |")
            cell = lambda x: x.replace("|", "/").replace("<", "&lt;")  # noqa: E731 (markdown)
            lines.append(f"| `{s.option}` | {cell(s.default_text())} | {s.role} | {cell(s.help)} |")
        return "\n".join(lines) + "\n"


def positive_zero(value):
    """A number as the record holds it: -0.0 (a flag given as -0) is 0.0, the value the run computes with; config.json
    would otherwise say -0.0."""
    return 0.0 if type(value) is float and value == 0 else value


def declared(cfg):
    return type(cfg).declared


def values(cfg):
    """The record as plain values (tuples as lists, as JSON and torch.save keep them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------------- the label

def method_name(cfg):
    """The row label of the paper's tables: OrthCR (v1), OrthSR (v3, attentive Cutout), CoOp, zero-shot CLIP,
    with the ablation in brackets, then each declared method setting's `label` where it is not at its default."""
    if cfg.zero_shot:
        return "zero-shot CLIP"
    name = ("OrthSR" if cfg.cutout == "attentive" else "OrthCR") if cfg.targets else "CoOp"
    if cfg.targets and cfg.prompt == "coop":
        name += " + CoOp"
    ablations = []
    if cfg.targets and set(cfg.towers) != {"visual", "text"}:
        ablations.append("image tower only" if cfg.towers == ("visual",) else "text tower only")
    if cfg.cutout == "none" and cfg.targets:
        ablations.append("w/o CutOut")
    if cfg.lambda1 == cfg.lambda2 == 0 and cfg.targets:
        ablations.append("w/o KL")
    if not cfg.targets:  # CoOp with OrthCR's other terms
        kl = cfg.lambda1 or (cfg.cutout != "none" and cfg.lambda2)
        extras = [term for term, used in (("KL", kl), ("CutOut", cfg.cutout != "none")) if used]
        ablations += [f"+ {' + '.join(extras)}"] if extras else []
    for s in declared(cfg):  # a method setting with a label: named where it is not at its (plain) default
        default = tuple(s.default) if isinstance(s.default, list) else s.default
        if s.label and getattr(cfg, s.name) != default:
            ablations.append(s.label)
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def method_tag(cfg):
    """The table label as a folder name: "OrthSR + CoOp (w/o CutOut)" -> "orthsr+coop-no-cutout"."""
    name = method_name(cfg).lower().replace("(+ ", "(").replace(", + ", "+").replace(" + ", "+").replace("w/o ", "no-")
    return "-".join(name.replace("(", " ").replace(")", " ").replace(",", " ").split())


def replace(cfg, **changes):
    """A copy of the record with `changes` (the record is immutable)."""
    return dataclasses.replace(cfg, **changes)
