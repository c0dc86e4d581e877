"""Input checks every pack node gets, installed once by collect_nodes() (no per-node code).

The host (ComfyUI 0.3.75) lets NaN through its FLOAT min/max checks (every comparison with NaN is false) and
does not check V3 combo values at all, so a missing adapter file was only found when the graph ran. Each node
class gets a `validate_inputs` that the host calls when the prompt is queued (/prompt):
- every FLOAT input: a finite number within its min/max;
- every file input (nodes/files.py FileInput): a file that is in its folder now, else a message naming it;
- every other combo: one of its options (the file lists of other loaders included);
- every filename_prefix (PrefixInput): a safe relative name.
The host passes a validator only the inputs its signature names, and skips its own min/max checks for them;
so the signature lists exactly these inputs (set through __signature__, read by inspect) and the min/max
checks are done here. A value that comes over a link is not known at queue time: `execute` is wrapped to run
the same float checks on the values it receives before the node's own code."""
import functools
import inspect
import math

from comfy_api.latest import io

from .files import FileInput, PrefixInput, check_file_name, check_filename_prefix


def float_problem(name: str, value, spec: io.Float.Input):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None   # a link not yet evaluated (None), or a list the node takes as is
    bounds = f" between {spec.min} and {spec.max}" if spec.min is not None and spec.max is not None else ""
    if math.isnan(value):
        return f"{name}: NaN (not a number) is not allowed; give a finite number{bounds}"
    if math.isinf(value):
        return f"{name}: {value} is not allowed; give a finite number{bounds}"
    if spec.min is not None and value < spec.min:
        return f"{name}: {value} is smaller than the minimum {spec.min}"
    if spec.max is not None and value > spec.max:
        return f"{name}: {value} is bigger than the maximum {spec.max}"
    return None


def combo_problem(name: str, value, spec: io.Combo.Input):
    options = list(spec.options or [])
    if value in options:
        return None
    shown = ", ".join(map(str, options[:12])) + (" ..." if len(options) > 12 else "") if options else "none available"
    return f"{name}: '{value}' is not one of the choices ({shown})"


def checked_inputs(schema) -> dict:
    """{input id: Input} for the inputs the pack checks itself."""
    return {i.id: i for i in schema.inputs
            if isinstance(i, (io.Float.Input, io.Combo.Input, PrefixInput)) and not isinstance(i, io.MultiCombo.Input)}


def problems(cls, values: dict, queued: bool) -> list[str]:
    found = []
    for name, spec in checked_inputs(cls.define_schema()).items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(spec, io.Float.Input):
            problem = float_problem(name, value, spec)
        elif not queued or value is None:
            problem = None    # combos and prefixes: at queue time here, at run time by the node's own code
        elif isinstance(spec, FileInput):
            problem = check_file_name(name, spec.folder_key, value)
        elif isinstance(spec, io.Combo.Input):
            problem = combo_problem(name, value, spec)
        else:
            problem = check_filename_prefix(value)
        if problem:
            found.append(problem)
    return found


def install_input_checks(cls):
    """Give a node class the queue-time validator and the run-time float check (idempotent)."""
    if getattr(cls, "_likeness_checks", False):
        return cls
    names = list(checked_inputs(cls.define_schema()))
    own = cls.__dict__.get("validate_inputs")
    own_func = own.__func__ if isinstance(own, classmethod) else None
    own_names = [p for p in inspect.signature(own_func).parameters][1:] if own_func else []
    if not names and not own_func:
        cls._likeness_checks = True
        return cls

    def validate_inputs(klass, **values):
        found = problems(cls, values, queued=True)
        if found:
            return "; ".join(found)
        if own_func:
            return own_func(klass, **{k: v for k, v in values.items() if k in own_names})
        return True

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
               for n in dict.fromkeys(names + own_names)]
    validate_inputs.__signature__ = inspect.Signature(params)
    cls.validate_inputs = classmethod(validate_inputs)

    execute = cls.__dict__["execute"].__func__ if isinstance(cls.__dict__.get("execute"), classmethod) else None
    if execute is not None and any(isinstance(s, io.Float.Input) for s in checked_inputs(cls.define_schema()).values()):
        signature = inspect.signature(execute)
        if inspect.iscoroutinefunction(execute):
            @functools.wraps(execute)
            async def checked(klass, *args, **inputs):
                _refuse(cls, signature, klass, args, inputs)
                return await execute(klass, *args, **inputs)
        else:
            @functools.wraps(execute)
            def checked(klass, *args, **inputs):
                _refuse(cls, signature, klass, args, inputs)
                return execute(klass, *args, **inputs)
        cls.execute = classmethod(checked)
    cls._likeness_checks = True
    return cls


def _refuse(cls, signature, klass, args, inputs):
    """The float checks on what execute() received (the host passes keywords; a script may pass them in order)."""
    values = dict(inputs)
    if args:
        try:
            values = dict(signature.bind_partial(klass, *args, **inputs).arguments)
        except TypeError:
            return   # the node's own call will say what is wrong
    found = problems(cls, values, queued=False)
    if found:
        raise ValueError("; ".join(found))
