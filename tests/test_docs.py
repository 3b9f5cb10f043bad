"""Every file the documentation points at is in the repository (or is a public URL).

Scans README.md and every other tracked ``*.md``, ``requirements*.txt`` and the Makefile for: markdown links,
paths under one of the repository's tracked folders (``benchmarks/RESULTS.md``, ``$SLAK/segmentation/configs/...``),
bare ``*.py`` / ``*.md`` names, anything that climbs out of the repository (``../``), and mentions of notes a user
does not have (the maintainers' "SPEC").
"""
import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACKED = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
DOCS = [f for f in TRACKED if f.endswith('.md') or re.fullmatch(r'(.*/)?requirements[^/]*\.txt', f)
        or f == 'Makefile']
TOP_DIRS = sorted({f.split('/')[0] for f in TRACKED if '/' in f})
BASENAMES = {os.path.basename(f) for f in TRACKED}
# Names that are not files of this repository, on purpose.
NOT_OURS = {
    'tools/train.py': "MMSegmentation's / MMDetection's own tools, run from their clones",
    'tools/test.py': "MMSegmentation's / MMDetection's own tools, run from their clones",
    'tools/dist_train.sh': "MMSegmentation's / MMDetection's own tools, run from their clones",
    'tools/dist_test.sh': "MMSegmentation's / MMDetection's own tools, run from their clones",
    '__init__.py': 'cutlass/ has none on purpose (the README says so)',
    'tests/test_models.py': "timm's own model tests, in timm's source distribution (RESULTS: timm's model test suite)",
}
LINK = re.compile(r'\]\(([^)\s]+)\)')
REPO_PATH = re.compile(r'(?<![\w/.-])(?:\$SLAK/)?((?:%s)/[\w./*-]*[\w*])' % '|'.join(map(re.escape, TOP_DIRS)))
BARE_NAME = re.compile(r'(?<![\w/.$-])([\w-]+\.(?:py|md))\b')
OUTSIDE = re.compile(r'(?<![\w.])\.\./[\w./-]+')


def references(path):
    """(line number, kind, target) for every reference in the file at ``path`` (relative to the repository)."""
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            for match in LINK.finditer(line):
                yield number, 'link', match.group(1)
            for match in OUTSIDE.finditer(line):
                yield number, 'outside', match.group(0)
            for match in REPO_PATH.finditer(line):
                yield number, 'path', match.group(1)
            for match in BARE_NAME.finditer(line):
                yield number, 'name', match.group(1)
            if re.search(r'\bSPEC\b|our notes', line):
                yield number, 'notes', line.strip()


def anchors(path):
    """GitHub's anchors of the markdown headings in ``path``: lower case, punctuation dropped, spaces to dashes."""
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        headings = [line.lstrip('#').strip() for line in f if line.startswith('#')]
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


def broken(path, kind, target):
    """Why ``target`` does not resolve, or None."""
    if kind == 'outside':
        return 'points outside the repository'
    if kind == 'notes':
        return "cites the maintainers' notes, which a user does not have"
    if target in NOT_OURS:
        return None
    if kind == 'link':
        if target.startswith('#'):
            return None if target[1:] in anchors(path) else 'no such heading in this file'
        if re.match(r'[a-z]+://|mailto:', target):
            return None
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target.split('#')[0]))
        return None if resolved in TRACKED or any(f.startswith(resolved + '/') for f in TRACKED) else 'no such file'
    if kind == 'name':
        return None if target in BASENAMES else 'no tracked file has this name'
    found = glob.glob(os.path.join(REPO, target.rstrip('/')))
    return None if found else 'no such file or folder'


@pytest.mark.parametrize('path', DOCS)
def test_every_reference_resolves_inside_the_repository(path):
    problems = [f'{path}:{n}: {target!r} {why}' for n, kind, target in references(path)
                if (why := broken(path, kind, target))]
    assert not problems, '\n'.join(problems)


def test_the_scan_finds_references():
    """The patterns do match (a scan that finds nothing would pass vacuously)."""
    kinds = {kind for path in DOCS for _, kind, _ in references(path)}
    assert {'link', 'path', 'name'} <= kinds
    assert 'README.md' in DOCS and 'requirements.txt' in DOCS and 'Makefile' in DOCS
    assert broken('README.md', 'outside', '../shared/ECOSYSTEM.md') and broken('README.md', 'link', 'nowhere.md')
    assert broken('README.md', 'path', 'benchmarks/NO_SUCH.md') and not broken('README.md', 'path', 'erf/README.md')
    assert broken('README.md', 'link', '#no-such-heading') and not broken('README.md', 'link', '#training')


def test_code_cites_no_notes_a_user_does_not_have():
    """Docstrings and comments explain themselves: no section numbers of the maintainers' notes ("SPEC 2.4")."""
    notes = re.compile(r'\bSPEC\b|our notes')
    problems = []
    for path in (f for f in TRACKED if f.endswith('.py') and f != 'tests/test_docs.py'):
        with open(os.path.join(REPO, path), encoding='utf-8') as f:
            problems += [f'{path}:{n}' for n, line in enumerate(f, 1) if notes.search(line)]
    assert not problems, problems
