"""Parameter checks: a bad value in a parameters cell is refused before any time or Drive space is spent.

What it keeps safe: a typo (EPOCHS = 0, LR = 50, SUBSET = 1, a run name that cannot name a file) stops the notebook
at its start call with a message naming the parameter, what is allowed, and what it got.
"""

import re

import helpers as H

# name: (kind, low, high, None allowed). Kinds: "int" (whole numbers), "float", "name" (a run's name; high = its
# longest length), "bool", "choice" / "choices" (low = the valid values), "ints", "text", "augment", "runs".
_BOOL, _EPOCHS, _BATCH = ("bool", 0, 1, False), ("int", 1, 1000, False), ("int", 2, 4096, False)
_LR, _MOMENTUM, _END_LR = ("float", 1e-6, 10.0, False), ("float", 0.0, 0.999, False), ("float", 1e-5, 100.0, False)
RULES = {
    **dict.fromkeys(("QUICK", "CLASS_BUDGET", "NESTEROV", "TTA", "INTERACTIVE", "RUN_VGG16", "USE_IN_03"), _BOOL),
    **dict.fromkeys(("EPOCHS", "FINAL_EPOCHS", "RESNET50_EPOCHS", "STEP_SIZE"), _EPOCHS),
    **dict.fromkeys(("BATCH_SIZE", "RESNET50_BATCH_SIZE"), _BATCH),
    **dict.fromkeys(("DEFAULT_LR", "FINAL_LR", "RESNET50_LR"), _LR), "LR": ("float", 1e-6, 10.0, True),
    **dict.fromkeys(("MOMENTUM", "MAX_MOMENTUM", "BASE_MOMENTUM"), _MOMENTUM),
    **dict.fromkeys(("END_LR", "LINEAR_END_LR"), _END_LR), "START_LR": ("float", 1e-8, 1.0, True),
    **dict.fromkeys(("NUM_ITER", "LINEAR_NUM_ITER"), ("int", 20, 10_000, False)),
    **dict.fromkeys(("N_PREVIEW", "PER_CLASS", "N_COMPARE"), ("int", 1, 50, False)),
    **dict.fromkeys(("N_SHOW", "N_GALLERY"), ("int", 1, 100, False)), "N_CAM": ("int", 1, 1000, False),
    "SUBSET": ("int", 20, 50_000, True), "SEED": ("int", 0, 2**31 - 1, False), "N_SEEDS": ("int", 1, 10, False),
    "VAL_FRACTION": ("float", 0.0, 0.5, False), "WEIGHT_DECAY": ("float", 0.0, 0.1, False),
    "LABEL_SMOOTHING": ("float", 0.0, 0.5, False), "PCT_START": ("float", 0.05, 0.95, False),
    "GAMMA": ("float", 1e-4, 1.0, False), "PATIENCE": ("int", 0, 100, False), "FACTOR": ("float", 1e-4, 0.99, False),
    "THRESHOLD": ("float", 0.0, 100.0, False), "ALPHA": ("float", 0.0, 1.0, False),
    "SMOOTH_F": ("float", 0.0, 0.99, False), "LINEAR_DIVERGE_TH": ("float", 1.0, 1e300, False),
    "EXPERIMENT": ("name", 1, 64, False), "AUGMENT": ("augment", 0, 0, False), "RUNS": ("runs", 0, 0, False),
    "PHOTO_URL": ("text", 0, 0, False), "GALLERY_SIZES": ("ints", 1, 100, False),
    "MODEL": ("choice", tuple(H.MODELS), None, False), "NORM": ("choice", H.NORMS, None, False),
    "RULE": ("choice", ("steepest", "valley", "minimum", "minimum/10"), None, False),
    "LAST_STRIDE": ("choice", (1, 2), None, False),
    "GRID_MODELS": ("choices", tuple(H.MODELS), None, False), "GRID_NORMS": ("choices", H.NORMS, None, False),
    "GRID_SCHEDULERS": ("choices", ("onecycle", "step", "plateau"), None, False),
    "CAM_LAYERS": ("choices", ("layer1", "layer2", "layer3", "layer4"), None, False),
}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


is_whole, is_number = H._whole, H._real  # whole / finite numbers, not bools: one definition, helpers' input checks


def problem(name, value):
    """What is wrong with one parameter's value, or None."""
    kind, low, high, none_ok = RULES[name]
    if value is None and none_ok:
        return None
    if kind == "choice":
        return None if value in low else f"{name} must be one of {', '.join(map(str, low))}, got {value!r}"
    if kind == "choices":
        ok = isinstance(value, (list, tuple)) and value and all(v in low for v in value)
        return None if ok else f"{name} must be a list of one or more of {', '.join(map(str, low))}, got {value!r}"
    if kind == "ints":
        ok = isinstance(value, (list, tuple)) and value and all(is_whole(v) and low <= v <= high for v in value)
        return None if ok else f"{name} must be a list of whole numbers from {low} to {high}, got {value!r}"
    if kind == "text":
        return None if isinstance(value, str) and value.strip() else f"{name} must be text, got {value!r}"
    if kind == "runs":
        if not isinstance(value, dict) or not value:
            return f"{name} must be a dict of run name: AUGMENT dict, got {value!r}"
        return next((p for n, a in value.items() if (p := name_problem(n, f"a run name in {name}") or
                                                     problem("AUGMENT", a))), None)
    if kind == "augment":
        try:
            H.check_augment(value)
        except (ValueError, TypeError) as err:
            return f"AUGMENT: {err}"
        return None
    if kind == "name":
        return name_problem(value, name, high)
    if kind == "bool":
        return None if isinstance(value, bool) else f"{name} must be True or False, got {value!r}"
    if (is_whole(value) or (kind == "float" and is_number(value))) and low <= value <= high:
        return None
    what = "a whole number" if kind == "int" else "a number"
    return f"{name} must be {what} from {low:g} to {high:g}{' (or None)' if none_ok else ''}, got {value!r}"


def check_parameters(params):
    """Refuse bad parameters, all listed in one error; params: {NAME: value} of a parameters cell."""
    unknown = sorted(set(params) - set(RULES))
    if unknown:
        raise ValueError(f"no rule for parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(RULES))}")
    problems = [p for name, value in params.items() if (p := problem(name, value))]
    subset, shown = params.get("SUBSET"), params.get("PER_CLASS", 0)
    if not problems and subset and shown > subset // 10:  # notebook 01 draws PER_CLASS images of every class
        problems.append(f"PER_CLASS={shown} needs SUBSET of at least {10 * shown} ({shown} a class), got {subset}")
    if problems:
        raise ValueError("bad parameter(s) in the parameters cell:\n  " + "\n  ".join(problems))


def name_problem(value, what="EXPERIMENT", max_len=64):
    """Why value cannot name a run's files, or None."""
    if isinstance(value, str) and _NAME.fullmatch(value) and len(value) <= max_len:
        return None
    return (f"{what} must be 1 to {max_len} letters, digits, '-', '_' or '.' (not first), got {value!r}: it names "
            f"the run's files in the workspace, e.g. 'resnet18_no_smoothing'")


def check_name(name, what="the run's name", max_len=100):
    """A run's name if it can name files safely, else a clear error."""
    if (why := name_problem(name, what, max_len)) is not None:
        raise ValueError(why)
    return name


def check_lr(value, what="LR", advice="Set LR in the parameters cell, or run notebook 02 again"):
    """A learning rate as a float if it is a number from 1e-6 to 10, else a clear error ending in advice."""
    low, high = RULES["LR"][1:3]
    if is_number(value) and low <= value <= high:
        return float(value)
    raise ValueError(f"{what} must be a number from {low:g} to {high:g}, got {value!r}: outside that range SGD does "
                     f"not train a ResNet. {advice}")
