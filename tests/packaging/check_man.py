#!/usr/bin/env python3
"""Check the hand-written man pages in docs/man against the code.

Usage: check_man.py PROJECT_SOURCE_DIR

1. Each page renders without a warning, with the command lintian runs
   (man --warnings ... -Z), and with groff -ww when groff is there; no trailing
   whitespace, no line starting with the no-break control character.
2. Every key of the config tables (the `.path = "..."` entries of each
   `struct cis_cfg_key` table, with the keys of a sub-table as PARENT[].KEY) has an
   entry in its section-5 page: a .TP whose tag starts with the key. A tag in the
   page's KEYS section that names no key of the table fails too (a stale entry).
3. Every option the programs recognise (the long options of their `struct option`
   tables, the letters of their getopt optstring, the words compared with argv by
   strcmp) is documented in the section-8 page: an option as a .TP tag, a command
   word in the SYNOPSIS.

Exits 0 when all is well, 1 listing every problem, 77 (skip) when man is missing.
"""
import os
import re
import shutil
import subprocess
import sys

PAGES = {
    # page: (config sources, option sources) relative to the source dir
    "cistern-agent.yaml.5": (["edge-agent/agent_config.c"], []),
    "cistern-receiver.yaml.5": (["cloud-receiver"], []),
    "cistern-agent.8": ([], ["edge-agent/main.c", "edge-agent/status.c", "edge-agent/enroll.c"]),
    "cistern-receiver.8": ([], ["cloud-receiver/main.c", "cloud-receiver/device_cmd.c"]),
}

FONT_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
problems = []


def fail(msg):
    problems.append(msg)
    print("FAIL: " + msg)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- C sources ----

def strip_c_comments(src):
    """Remove comments, keeping string literals (which may hold // as in tcp://)."""
    pat = re.compile(r'("(?:\\.|[^"\\\n])*")|/\*.*?\*/|//[^\n]*', re.S)
    return pat.sub(lambda m: m.group(1) if m.group(1) else " ", src)


def c_files(src_dir, rels):
    out = []
    for rel in rels:
        p = os.path.join(src_dir, rel)
        if os.path.isdir(p):
            for root, _dirs, files in os.walk(p):
                out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".c")]
        else:
            out.append(p)
    return out


def config_keys(files):
    """Every key path of the cis_cfg_key tables in FILES; keys of a table reached
    through `.sub = &schema` are prefixed with PARENT[]."""
    tables, schemas = {}, {}
    for path in files:
        src = strip_c_comments(read(path))
        for m in re.finditer(r"struct\s+cis_cfg_key\s+(\w+)\s*\[\s*\]\s*=\s*\{(.*?)\n\s*\};",
                             src, re.S):
            body = m.group(2)
            starts = [e.start() for e in re.finditer(r"\.path\s*=", body)]
            entries = []
            for i, s in enumerate(starts):
                text = body[s:starts[i + 1] if i + 1 < len(starts) else len(body)]
                pm = re.match(r'\.path\s*=\s*"([^"]*)"', text)
                if not pm:
                    continue  # the {.path = NULL} terminator
                sm = re.search(r"\.sub\s*=\s*&\s*(\w+)", text)
                entries.append((pm.group(1), sm.group(1) if sm else None))
            tables[m.group(1)] = entries
        for m in re.finditer(r"struct\s+cis_cfg_schema\s+(\w+)\s*=\s*\{[^;]*?\.keys\s*=\s*(\w+)",
                             src, re.S):
            schemas[m.group(1)] = m.group(2)
    subs = {schemas.get(sub) for entries in tables.values() for _p, sub in entries if sub}
    keys = []

    def walk(table, prefix, depth):
        for path, sub in tables.get(table, []):
            keys.append(prefix + path)
            if sub and depth < 8:
                walk(schemas.get(sub), prefix + path + "[].", depth + 1)

    for name in tables:
        if name not in subs:
            walk(name, "", 0)
    return keys


def program_options(files):
    """(long options, short option letters, command words) that FILES recognise."""
    longs, shorts, words = set(), set(), set()
    for path in files:
        src = strip_c_comments(read(path))
        for m in re.finditer(r"struct\s+option\s+\w+\s*\[\s*\]\s*=\s*\{(.*?)\n\s*\};", src, re.S):
            longs.update(re.findall(r'\{\s*"([^"]+)"\s*,\s*\w+_argument', m.group(1)))
        for m in re.finditer(r'getopt(?:_long)?\s*\(\s*\w+\s*,\s*\w+\s*,\s*"([^"]*)"', src):
            shorts.update(c for c in m.group(1) if c.isalnum())
        for m in re.finditer(r'strn?cmp\s*\(\s*argv\s*\[[^\]]+\]\s*,\s*"([^"]+)"', src):
            s = m.group(1)
            if s.startswith("--"):
                longs.add(s[2:])
            elif s.startswith("-"):
                shorts.update(s[1:2])
            else:
                words.add(s)
    return longs, shorts, words


# ---- roff ----

def roff_args(s):
    """Split macro arguments the way roff does: blanks separate, "..." groups,
    "" inside quotes is a quote."""
    args, i, n = [], 0, len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            break
        if s[i] == '"':
            i += 1
            cur = []
            while i < n:
                if s[i] == '"':
                    if i + 1 < n and s[i + 1] == '"':
                        cur.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                cur.append(s[i])
                i += 1
            args.append("".join(cur))
        else:
            j = i
            while j < n and s[j] not in " \t":
                j += 1
            args.append(s[i:j])
            i = j
    return args


def unescape(s):
    s = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", s)
    s = s.replace("\\-", "-").replace("\\(dq", '"').replace("\\(aq", "'").replace("\\e", "\\")
    s = s.replace("\\&", "").replace("\\%", "").replace("\\c", "").replace("\\ ", " ")
    s = re.sub(r"\\\(..", "", s)
    s = re.sub(r"\\\[[^\]]*\]", "", s)
    return s


def roff_text(line):
    """The text a line contributes, or None for a comment or a request without text."""
    if line.startswith('.\\"') or line.startswith("'\\\""):
        return None
    if line.startswith("."):
        parts = line[1:].split(None, 1)
        if not parts:
            return None
        macro, rest = parts[0], parts[1] if len(parts) > 1 else ""
        args = roff_args(rest)
        if macro in FONT_ALTERNATING:
            return unescape("".join(args))
        if macro in {"B", "I", "SH", "SS"}:
            return unescape(" ".join(args))
        return None
    return unescape(line)


def parse_page(text):
    """Sections (name -> text) and .TP tags (list of (section, tag text))."""
    sections, tags = {}, []
    section, expect_tag = "", False
    for line in text.split("\n"):
        if line.startswith(".SH"):
            section = " ".join(roff_args(line[3:]))
            sections.setdefault(section, [])
            expect_tag = False
            continue
        if re.match(r"\.TP\b", line):
            expect_tag = True
            continue
        t = roff_text(line)
        if t is None:
            continue
        if expect_tag:
            tags.append((section, t.strip()))
            expect_tag = False
        sections.setdefault(section, []).append(t)
    return {k: "\n".join(v) for k, v in sections.items()}, tags


def word_in(word, text):
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


# ---- checks ----

def check_render(path):
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", path],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or r.stderr.strip():
        fail("%s: man --warnings (exit %d): %s" % (path, r.returncode, r.stderr.strip()))
    if shutil.which("groff"):
        r = subprocess.run(["groff", "-man", "-ww", "-z", path], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or r.stderr.strip():
            fail("%s: groff -man -ww -z (exit %d): %s" % (path, r.returncode, r.stderr.strip()))
    for no, line in enumerate(read(path).split("\n"), 1):
        if line != line.rstrip():
            fail("%s:%d: trailing whitespace" % (path, no))
        if line.startswith("'") and not line.startswith("'\\\""):
            fail("%s:%d: a line starting with ' is a control line; write \\&' " % (path, no))


def main():
    if len(sys.argv) != 2:
        print("usage: check_man.py PROJECT_SOURCE_DIR", file=sys.stderr)
        return 2
    src_dir = sys.argv[1]
    if not shutil.which("man"):
        print("SKIP: man is not installed (apt-get install man-db)")
        return 77
    for page, (cfg_src, opt_src) in PAGES.items():
        path = os.path.join(src_dir, "docs", "man", page)
        if not os.path.isfile(path):
            fail("%s: missing" % path)
            continue
        before = len(problems)
        check_render(path)
        sections, tags = parse_page(read(path))
        m = re.search(r"^\.TH\s+(\S+)\s+(\S+)", read(path), re.M)
        name, sect = page.rsplit(".", 1)
        if not m or m.group(1) != name.upper() or m.group(2) != sect:
            fail("%s: .TH should start with %s %s" % (page, name.upper(), sect))
        tag_words = {t.split()[0] for _s, t in tags if t.split()}
        if cfg_src:
            keys = config_keys(c_files(src_dir, cfg_src))
            if not keys:
                fail("%s: no .path keys found in %s (has the table moved?)" % (page, cfg_src))
            for k in keys:
                if k not in tag_words:
                    fail("%s: key %s (from %s) has no entry" % (page, k, ", ".join(cfg_src)))
            for s, t in tags:
                if s == "KEYS" and t.split() and t.split()[0] not in keys:
                    fail("%s: entry %r names no key of the table" % (page, t.split()[0]))
            print("%s: %d keys checked" % (page, len(keys)))
        if opt_src:
            longs, shorts, words = program_options([os.path.join(src_dir, f) for f in opt_src])
            if not longs:
                fail("%s: no long options found in %s" % (page, opt_src))
            tag_text = "\n".join(t for _s, t in tags)
            for o in sorted(longs):
                if not word_in("--" + o, tag_text):
                    fail("%s: option --%s (from %s) is not documented" % (page, o, ", ".join(opt_src)))
            for o in sorted(shorts):
                if not word_in("-" + o, tag_text):
                    fail("%s: option -%s (from %s) is not documented" % (page, o, ", ".join(opt_src)))
            for w in sorted(words):
                if not word_in(w, sections.get("SYNOPSIS", "")):
                    fail("%s: command %s (from %s) is not in the SYNOPSIS" % (page, w, ", ".join(opt_src)))
            print("%s: options checked: %s; commands: %s" % (
                page, " ".join(["--" + o for o in sorted(longs)] + ["-" + o for o in sorted(shorts)]),
                " ".join(sorted(words)) or "-"))
        if len(problems) == before:
            print("ok: %s" % page)
    if problems:
        print("%d problem(s)" % len(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
