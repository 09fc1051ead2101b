#!/usr/bin/env python3
"""Read `cargo modules dependencies` (dot) on stdin; print every cycle of
"uses" edges between modules (files) and exit 1 if there is one."""
import re
import sys

edges = {}
for line in sys.stdin:
    m = re.match(r'\s*"([^"]+)" -> "([^"]+)" \[label="uses"', line)
    if m and m.group(1) != m.group(2):
        edges.setdefault(m.group(1), set()).add(m.group(2))

# Tarjan's strongly connected components.
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = n[0]
    n[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in list(edges):
    if v not in index:
        visit(v)
for c in sccs:
    print("import cycle among: " + ", ".join(c))
    for a in c:
        for b in sorted(edges.get(a, ())):
            if b in c:
                print(f"  {a} -> {b}")
sys.exit(1 if sccs else 0)
