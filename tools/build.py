#!/usr/bin/env python3
"""Build the one-file vmbackup.py that users copy from the package in src/vmbackup/.

    tools/build.py             write vmbackup.py
    tools/build.py --check     exit 1 if vmbackup.py is not a fresh build of src/
    tools/build.py --order     print the modules in the order they are joined

The modules are joined in dependency order (a module comes after every module it
imports from), each under a banner with its name and its docstring as comments;
the package's own imports are dropped (in one file the names are already there)
and the standard-library imports are hoisted to the top, once each.

The build refuses, with one line naming the file and line, what it cannot flatten
faithfully: a relative import, `import vmbackup.x`, an aliased or star import from
the package, a package import below the top level, an imported name its module does
not define, a top-level name defined in two modules, and import cycles.
Standard library only, like the file it builds.
"""

import argparse
import ast
import os
import sys
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "vmbackup"
HEADER = "# Built by tools/build.py from src/vmbackup/: edit the modules there and run `make`."


class BuildError(Exception):
    """One line naming the file and line of what cannot be built."""


class Module(typing.NamedTuple):
    name: str            # dotted: vmbackup.formats.xva
    path: str
    doc: str
    imports: tuple       # source text of hoistable top-level imports
    deps: dict           # module name -> set of imported names
    defines: dict        # top-level name -> line
    body: str


def find_modules(src):
    """Return {dotted name: path} of the package under `src` (without __main__)."""
    found = {}
    top = os.path.join(src, PACKAGE)
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for file in sorted(files):
            if not file.endswith(".py") or file == "__main__.py":
                continue
            rel = os.path.relpath(os.path.join(folder, file), src)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(folder, file)
    return found


def _where(path, node):
    return "%s:%d" % (os.path.relpath(path, ROOT), node.lineno)


def _defined_names(node):
    """Names a top-level statement binds (looking inside try/if/with, not into defs)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    if isinstance(node, ast.Assign):
        return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)]
    names = []
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, None) or ():
            names += _defined_names(child)
    return names


def _is_package(name):
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def parse_module(name, path):
    """Read one module: its docstring, imports, dependencies, names and body."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        tree = ast.parse(text, path)
    except SyntaxError as exc:
        raise BuildError("%s:%s: %s" % (os.path.relpath(path, ROOT), exc.lineno, exc.msg))
    lines = text.splitlines()
    doc = ast.get_docstring(tree) or ""
    top = set()
    imports, deps, defines, cut = [], {}, {"__doc__": 1} if doc else {}, set()
    for index, node in enumerate(tree.body):
        span = range(node.lineno - 1, node.end_lineno)
        if index == 0 and doc and isinstance(node, ast.Expr):
            cut.update(span)
            continue
        if isinstance(node, ast.ImportFrom) and (node.level or _is_package(node.module or "")):
            top.add(node)
            if node.level:
                raise BuildError("%s: relative import: write `from vmbackup.x import name`"
                                 % _where(path, node))
            for alias in node.names:
                if alias.name == "*" or alias.asname:
                    raise BuildError("%s: `%s` cannot be flattened: import plain names"
                                     % (_where(path, node), ast.get_source_segment(text, node)))
            deps.setdefault(node.module, {})
            for alias in node.names:
                deps[node.module][alias.name] = node.lineno
            cut.update(span)
            continue
        if isinstance(node, ast.Import) and any(_is_package(a.name) for a in node.names):
            raise BuildError("%s: `import %s` cannot be flattened: use `from %s import name`"
                             % (_where(path, node), node.names[0].name, node.names[0].name))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.add(node)
            imports.append(ast.get_source_segment(text, node))
            cut.update(span)
            continue
        for bound in _defined_names(node):
            defines.setdefault(bound, node.lineno)
    for node in ast.walk(tree):
        if node in top:
            continue
        if isinstance(node, ast.Import) and any(_is_package(a.name) for a in node.names):
            raise BuildError("%s: `import %s` cannot be flattened: use `from %s import name`"
                             % (_where(path, node), node.names[0].name, node.names[0].name))
        if isinstance(node, ast.ImportFrom) and (node.level or _is_package(node.module or "")):
            raise BuildError("%s: package import below the top level cannot be flattened"
                             % _where(path, node))
    body = "\n".join(line for number, line in enumerate(lines) if number not in cut)
    return Module(name, path, doc, tuple(imports), deps, defines, body.strip("\n"))


def build_order(modules):
    """Return module names so each comes after the modules it imports from.

    Layer by layer: a module's depth is the length of its longest import chain, and
    the file reads from the bottom layer (errors, util) up to the command line.
    """
    depth, state = {}, {}

    def measure(name, chain):
        if state.get(name) == "busy":
            cycle = chain[chain.index(name):] + [name]
            raise BuildError("%s: import cycle: %s" % (
                os.path.relpath(modules[name].path, ROOT), " -> ".join(cycle)))
        if name not in depth:
            state[name] = "busy"
            depth[name] = 1 + max([measure(dep, chain + [name])
                                   for dep in modules[name].deps if dep != PACKAGE] or [0])
            state[name] = "done"
        return depth[name]

    for name in modules:
        measure(name, [])
    return sorted(modules, key=lambda n: (n != PACKAGE, depth[n], n))


def check_names(modules):
    """Refuse a name defined twice, or imported from a module that lacks it."""
    owner = {}
    for name in sorted(modules):
        module = modules[name]
        for bound, line in sorted(module.defines.items()):
            if bound == "__doc__":      # each module has one; `from vmbackup import __doc__`
                continue                # is the package's, the built file's own docstring
            if bound in owner:
                first = modules[owner[bound]]
                raise BuildError("%s:%d: `%s` is also defined in %s:%d" % (
                    os.path.relpath(module.path, ROOT), line, bound,
                    os.path.relpath(first.path, ROOT), first.defines[bound]))
            owner[bound] = name
        for dep, names in module.deps.items():
            if dep not in modules:
                raise BuildError("%s:%d: no module %s in src/" % (
                    os.path.relpath(module.path, ROOT), min(names.values()), dep))
            for imported, line in names.items():
                if imported not in modules[dep].defines:
                    raise BuildError("%s:%d: %s does not define `%s`" % (
                        os.path.relpath(module.path, ROOT), line, dep, imported))


def _comment(text):
    return "\n".join(("# " + line).rstrip() for line in text.splitlines())


def build(src):
    """Return the text of the one-file vmbackup.py built from the package in `src`."""
    paths = find_modules(src)
    if PACKAGE not in paths:
        raise BuildError("%s: no %s/__init__.py" % (src, PACKAGE))
    modules = {name: parse_module(name, path) for name, path in paths.items()}
    check_names(modules)
    order = build_order(modules)
    package = modules[PACKAGE]
    imports = []
    for name in order:
        for line in modules[name].imports:
            if line not in imports:
                imports.append(line)
    plain = sorted(i for i in imports if i.startswith("import "))
    froms = sorted(i for i in imports if not i.startswith("import "))
    parts = ["#!/usr/bin/env python3\n" + '"""' + package.doc + '\n"""\n\n' + HEADER,
             package.body, "\n".join(plain + froms)]
    for name in order:
        module = modules[name]
        if name == PACKAGE or not module.body:
            continue
        rel = module.name.replace(".", "/") + (".py" if not module.path.endswith("__init__.py")
                                               else "/__init__.py")
        banner = "# " + ("=== %s " % rel).ljust(76, "=")
        parts.append(banner + "\n" + _comment(module.doc) + "\n\n" + module.body)
    return "\n\n\n".join(part for part in parts if part) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/build.py", description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=os.path.join(ROOT, "src"))
    parser.add_argument("--out", default=os.path.join(ROOT, "vmbackup.py"))
    parser.add_argument("--check", action="store_true",
                        help="fail if the output file differs from a fresh build")
    parser.add_argument("--order", action="store_true", help="print the build order")
    args = parser.parse_args(argv)
    try:
        if args.order:
            paths = find_modules(args.src)
            modules = {n: parse_module(n, p) for n, p in paths.items()}
            print("\n".join(build_order(modules)))
            return 0
        text = build(args.src)
    except BuildError as exc:
        print("build.py: %s" % exc, file=sys.stderr)
        return 2
    if args.check:
        try:
            with open(args.out, encoding="utf-8") as handle:
                current = handle.read()
        except OSError:
            current = None
        if current != text:
            print("build.py: %s is not a fresh build of %s: run `make` and commit it"
                  % (os.path.relpath(args.out), os.path.relpath(args.src)), file=sys.stderr)
            return 1
        return 0
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
