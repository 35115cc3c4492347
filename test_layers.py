"""The shape of the code: every import points up the README's reading order, and lines read on one screen.

README.md's "Reading order" section names every module in the order a reader meets them (the first mention
of each `file.py`); its table says, per file, which files it may import. These tests read both from the
README and every import from the code (`import x`, `from x import y`, inside functions too), so the README
and the code cannot drift apart.
"""

import ast
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_MODULES = 19


def modules():
    """The project's modules: every .py file here but the tests."""
    names = []
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py") and not name.startswith("test_") and name != "conftest.py":
            names.append(name[:-3])
    return names


def reading_order_section():
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    start = text.index("## Reading order")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def reading_order():
    """The modules in the order of their first mention in README's reading order."""
    order = []
    for name in re.findall(r"\b([a-z_0-9]+)\.py\b", reading_order_section()):
        if name not in order:
            order.append(name)
    return order


def allowed_imports():
    """{module: the modules its row in the reading-order table says it may import}."""
    allowed = {}
    for row in reading_order_section().splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        module = cells[1].strip("`")[:-3]
        allowed[module] = set(re.findall(r"[a-z_0-9]+", cells[3])) - {"nothing", "of", "this", "project"}
    return allowed


def imports_of(module, project):
    """The project modules `module` imports anywhere in its file (top level, functions, methods)."""
    source = open(os.path.join(HERE, module + ".py"), encoding="utf-8").read()
    return imports_in(source, project) - {module}


def imports_in(source, project):
    """The project modules a Python source imports anywhere in it."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name.split(".")[0])
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(project)


def test_every_module_is_in_the_reading_order_and_there_are_few():
    order = reading_order()
    missing = [module for module in modules() if module not in order]
    assert missing == []
    assert len(modules()) <= MAX_MODULES


def test_every_import_points_to_an_earlier_file_so_there_is_no_cycle():
    order = reading_order()
    project = modules()
    upward = []
    for module in project:
        for imported in imports_of(module, project):
            if order.index(imported) >= order.index(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_the_readme_table_says_what_each_file_imports():
    project = modules()
    allowed = allowed_imports()
    assert sorted(allowed) == project  # one row per module
    unlisted = []
    for module in project:
        for imported in sorted(imports_of(module, project) - allowed[module]):
            unlisted.append(f"{module} imports {imported}, which its row does not list")
    assert unlisted == []


def test_the_import_walk_sees_imports_inside_functions_and_methods():
    """(So the tests above can fail: an import hidden in a function counts as much as one at the top.)"""
    source = ("import numpy\n"
              "def f():\n"
              "    import demo\n"
              "class A:\n"
              "    def g(self):\n"
              "        from record import write_lerobot_dataset\n"
              "        from .x import y\n")
    assert imports_in(source, modules()) == {"demo", "record"}


def test_at_most_one_line_in_a_hundred_is_over_120_characters():
    total = 0
    long_lines = []
    for module in modules():
        lines = open(os.path.join(HERE, module + ".py"), encoding="utf-8").read().splitlines()
        total += len(lines)
        for number, line in enumerate(lines, 1):
            if len(line) > 120:
                long_lines.append(f"{module}.py:{number}")
    assert len(long_lines) <= total / 100, long_lines
