# yaml2tree.awk: turn the small YAML subset used by NoCloud seeds into a directory tree.
#
# Usage: awk -v out=DIR -f yaml2tree.awk FILE
#
# Every mapping and sequence becomes a directory under DIR and every scalar a file holding the
# scalar's exact bytes (no newline is added). Sequence items are named 0000, 0001, ... so that a
# shell glob lists them in order. Mapping keys are used as file names, with every character
# outside [A-Za-z0-9_.-] replaced by '_'. For example
#
#     hostname: box1                 ->  DIR/hostname                  = "box1"
#     write_files:                   ->  DIR/write_files/0000/path     = "/etc/x"
#       - path: /etc/x                   DIR/write_files/0000/content  = "a\nb\n"
#         content: |
#           a
#           b
#     runcmd: ["echo hi"]            ->  DIR/runcmd/0000               = "echo hi"
#
# Errors and unsupported constructs are reported on stderr as "yaml: line N: ..." and make the
# exit status 1; the rest of the document is still converted.
#
# Accepted YAML (this is what the daemon must emit; anything else is rejected or misread):
#   - Block mappings "key: value" and block sequences "- value", indented with spaces only
#     (no tabs). A sequence may sit at the same indentation as its parent key ("key:\n- a").
#     A sequence item may open a mapping on the dash line ("- path: /x\n  content: y") or a
#     nested sequence ("- - a").
#   - Keys: plain (no ": " inside) or quoted with "..." or '...'.
#   - Scalars on one line:
#       plain        hello world        (a " #" starts a comment; leading/trailing blanks dropped;
#                                        must not start with one of  & * ! | > % @ `)
#       double-quoted "a \"b\"\n"       (JSON escapes \" \\ \/ \b \f \n \r \t \uXXXX incl.
#                                        surrogate pairs, plus YAML's \a \e \v \xXX \UXXXXXXXX;
#                                        \0 is refused; the string must end on the same line)
#       single-quoted 'it''s'           ('' is a quote; must end on the same line)
#     Plain scalars are kept as text: true, 0600, null and ~ are not interpreted.
#   - Literal block scalars: "|", "|-", "|+", optionally with an indentation digit ("|2", "|2-",
#     "|-2"), and an optional trailing comment. Content lines must be indented more than the key
#     (or dash) that owns the block; the indentation of the first non-empty line is removed from
#     every line. Chomping: "|" keeps one final newline, "|-" none, "|+" all trailing newlines.
#   - Flow collections on one line: [a, "b", 'c'] and {"k": "v", k2: v2}, nested, with the
#     scalar forms above (plain scalars end at , ] } and, for keys, at ":").
#   - Full-line comments, blank lines, and "---" / "..." document markers.
# Not accepted: folded scalars (">"), multi-line quoted or plain scalars, anchors and aliases
# (&a, *a), tags (!!binary), complex keys ("? "), tabs used for indentation, several documents.

BEGIN {
	if (out == "") { print "yaml: -v out=DIR is required" > "/dev/stderr"; exit 2 }
	errors = 0; depth = 0; pend = ""; blk = 0
	HEX = "0123456789abcdef"
	mkdirs("")
}

{
	line = $0
	sub(/\r$/, "", line)
	if (blk && block_line(line)) next
	if (line ~ /^[ ]*(#.*)?$/) next
	if (line ~ /^(---|\.\.\.)[ ]*(#.*)?$/) next
	if (line ~ /^[ ]*\t/) { err("tab used for indentation"); next }
	match(line, /^ */)
	handle(RLENGTH, substr(line, RLENGTH + 1))
}

END {
	if (blk) finish_block()
	if (pend != "") leaf(pend, "")
	exit errors ? 1 : 0
}

function err(msg) {
	printf "yaml: line %d: %s\n", NR, msg > "/dev/stderr"
	errors++
}

function mkdirs(p) {
	if (p in made) return
	made[p] = 1
	system("mkdir -p '" out p "'")
}

function leaf(p, v,    f, d) {
	d = p; sub(/\/[^\/]*$/, "", d)
	mkdirs(d)
	f = out p
	printf "%s", v > f
	close(f)
}

function keyname(k) {
	gsub(/[^A-Za-z0-9_.-]/, "_", k)
	if (k == "" || k ~ /^\.+$/) k = "_" k
	return k
}

function idxname(i) { return sprintf("%04d", i) }

function push(ind, p, k) {
	depth++
	lvl[depth] = ind; path[depth] = p; kind[depth] = k; cnt[depth] = 0
	mkdirs(p)
}

function is_item(t) { return t ~ /^-( |$)/ }

# One logical (non-blank, non-comment) line at indentation ind.
function handle(ind, text,    ip, rest, off) {
	if (pend != "") {
		if (ind > pend_ind || (ind == pend_ind && pend_inmap && is_item(text))) {
			push(ind, pend, is_item(text) ? "seq" : "map")
		} else {
			leaf(pend, "")
		}
		pend = ""
	}
	# Close deeper containers; a same-indentation sequence ends at the first non-item line.
	while (depth > 0 && (ind < lvl[depth] || (ind == lvl[depth] && kind[depth] == "seq" && !is_item(text))))
		depth--
	if (depth == 0) {
		if (ind != 0) { err("document must start at column 0"); return }
		push(0, "", is_item(text) ? "seq" : "map")
	}
	if (ind != lvl[depth]) { err("unexpected indentation"); return }
	if (kind[depth] == "map") {
		if (is_item(text)) { err("sequence item where a mapping key was expected"); return }
		map_line(ind, text)
		return
	}
	if (!is_item(text)) { err("expected a '- ' sequence item"); return }
	ip = path[depth] "/" idxname(cnt[depth]++)
	rest = substr(text, 2)
	match(rest, /^ */); off = RLENGTH
	rest = substr(rest, off + 1)
	if (rest == "" || rest ~ /^#/) {
		pend = ip; pend_ind = ind; pend_inmap = 0
	} else if (is_item(rest)) {
		push(ind + 1 + off, ip, "seq")
		handle(ind + 1 + off, rest)
	} else if (key_len(rest) > 0) {
		push(ind + 1 + off, ip, "map")
		map_line(ind + 1 + off, rest)
	} else {
		value(ip, rest, ind)
	}
}

# Length of the "key:" prefix of t (including the colon), or 0 if t is not "key: ...".
function key_len(t,    m) {
	if (t ~ /^"([^"\\]|\\.)*"[ ]*:( |$)/ || t ~ /^'([^']|'')*'[ ]*:( |$)/) {
		# The quoted key may itself contain ": ", so find the colon after the closing quote.
		m = quoted_end(t)
		if (m == 0) return 0
		t = substr(t, m + 1)
		match(t, /^[ ]*:/)
		return m + RLENGTH
	}
	if (t ~ /^[^ "'#\[\{&*!|>%@`-]/ || t ~ /^-[^ ]/) {
		if (match(t, /:( |$)/)) return RSTART
	}
	return 0
}

# Index of the closing quote of the quoted string that starts t (0 if unterminated).
function quoted_end(t,    q, i, c) {
	q = substr(t, 1, 1)
	for (i = 2; i <= length(t); i++) {
		c = substr(t, i, 1)
		if (q == "\"" && c == "\\") { i++; continue }
		if (c == q) {
			if (q == "'" && substr(t, i + 1, 1) == "'") { i++; continue }
			return i
		}
	}
	return 0
}

function map_line(ind, text,    kl, key, rest) {
	kl = key_len(text)
	if (kl == 0) { err("expected 'key: value'"); return }
	key = substr(text, 1, kl - 1)
	sub(/[ ]+$/, "", key)
	if (key ~ /^["']/) key = unquote(key)
	rest = substr(text, kl + 1)
	sub(/^[ ]+/, "", rest)
	if (rest == "" || rest ~ /^#/) {
		pend = path[depth] "/" keyname(key); pend_ind = ind; pend_inmap = 1
		return
	}
	value(path[depth] "/" keyname(key), rest, ind)
}

function unquote(s) {
	fs = s; fp = 1
	return substr(s, 1, 1) == "\"" ? dq() : sq()
}

# A scalar or flow collection that starts a value; owner is the indentation of its key or dash.
function value(p, v, owner,    h, r) {
	if (v ~ /^\|/) {
		h = v; sub(/[ ]+#.*$/, "", h); sub(/[ ]+$/, "", h)
		if (h !~ /^\|([-+]?[1-9]?|[1-9][-+])$/) { err("bad block scalar header '" h "'"); return }
		blk = 1; bpath = p; bowner = owner; bn = 0
		bchomp = h ~ /-/ ? "strip" : (h ~ /\+/ ? "keep" : "clip")
		bind = -1
		if (match(h, /[1-9]/)) bind = owner + substr(h, RSTART, 1)
		return
	}
	if (v ~ /^>/) { err("folded block scalars ('>') are not supported, use '|'"); return }
	if (v ~ /^[&*!%@`]/) { err("anchors, aliases and tags are not supported"); return }
	fs = v; fp = 1
	if (v ~ /^[\[\{]/) flow(p)
	else if (v ~ /^"/) leaf(p, dq())
	else if (v ~ /^'/) leaf(p, sq())
	else { r = v; sub(/[ ]+#.*$/, "", r); sub(/[ ]+$/, "", r); leaf(p, r); return }
	r = substr(fs, fp)
	if (r !~ /^[ ]*(#.*)?$/) err("unexpected text after value: '" r "'")
}

# Literal block scalar lines. Returns 1 if the line belongs to the block.
function block_line(line,    n) {
	match(line, /^ */); n = RLENGTH
	if (line ~ /^ *$/) {
		bl[++bn] = (bind >= 0 && n > bind) ? substr(line, bind + 1) : ""
		return 1
	}
	if (bind < 0) {
		if (n <= bowner) { finish_block(); return 0 }
		bind = n
	}
	if (n >= bind) { bl[++bn] = substr(line, bind + 1); return 1 }
	finish_block()
	return 0
}

function finish_block(    last, i, s) {
	blk = 0
	last = bn
	while (last > 0 && bl[last] == "") last--
	s = ""
	for (i = 1; i <= last; i++) s = s bl[i] "\n"
	if (bchomp == "strip") sub(/\n$/, "", s)
	else if (bchomp == "keep") for (i = last + 1; i <= bn; i++) s = s "\n"
	leaf(bpath, s)
}

# ---- one-line scanners over the global string fs from position fp ----

function skipws() { while (substr(fs, fp, 1) == " ") fp++ }

function flow(p,    c, i, k) {
	skipws()
	c = substr(fs, fp, 1)
	if (c == "[") {
		mkdirs(p); fp++; i = 0
		skipws()
		if (substr(fs, fp, 1) == "]") { fp++; return }
		while (1) {
			flow(p "/" idxname(i++))
			skipws(); c = substr(fs, fp, 1); fp++
			if (c == ",") { skipws(); if (substr(fs, fp, 1) == "]") { fp++; return } continue }
			if (c == "]") return
			err("expected ',' or ']' in flow sequence"); fp = length(fs) + 1; return
		}
	}
	if (c == "{") {
		mkdirs(p); fp++
		skipws()
		if (substr(fs, fp, 1) == "}") { fp++; return }
		while (1) {
			skipws(); c = substr(fs, fp, 1)
			if (c == "\"") k = dq(); else if (c == "'") k = sq(); else k = plain(",:]}")
			skipws()
			if (substr(fs, fp, 1) != ":") { err("expected ':' in flow mapping"); fp = length(fs) + 1; return }
			fp++
			flow(p "/" keyname(k))
			skipws(); c = substr(fs, fp, 1); fp++
			if (c == ",") { skipws(); if (substr(fs, fp, 1) == "}") { fp++; return } continue }
			if (c == "}") return
			err("expected ',' or '}' in flow mapping"); fp = length(fs) + 1; return
		}
	}
	if (c == "\"") leaf(p, dq())
	else if (c == "'") leaf(p, sq())
	else leaf(p, plain(",]}"))
}

function plain(stops,    s, c) {
	s = ""
	while (fp <= length(fs)) {
		c = substr(fs, fp, 1)
		if (index(stops, c)) break
		if (c == "#" && substr(fs, fp - 1, 1) == " ") { fp = length(fs) + 1; break }
		s = s c; fp++
	}
	sub(/^[ ]+/, "", s); sub(/[ ]+$/, "", s)
	return s
}

function sq(    s, r, i) {
	fp++; s = ""
	while (1) {
		r = substr(fs, fp)
		i = index(r, "'")
		if (i == 0) { err("unterminated single-quoted string"); fp = length(fs) + 1; return s r }
		s = s substr(r, 1, i - 1); fp += i
		if (substr(fs, fp, 1) != "'") return s
		s = s "'"; fp++
	}
}

function dq(    s, r, i, c, cp, lo) {
	fp++; s = ""
	while (1) {
		r = substr(fs, fp)
		if (!match(r, /["\\]/)) { err("unterminated double-quoted string"); fp = length(fs) + 1; return s r }
		s = s substr(r, 1, RSTART - 1); fp += RSTART
		if (substr(r, RSTART, 1) == "\"") return s
		c = substr(fs, fp, 1); fp++
		if (c == "n") s = s "\n"
		else if (c == "t") s = s "\t"
		else if (c == "r") s = s "\r"
		else if (c == "\"" || c == "\\" || c == "/" || c == " ") s = s c
		else if (c == "b") s = s "\b"
		else if (c == "f") s = s "\f"
		else if (c == "a") s = s "\007"
		else if (c == "e") s = s "\033"
		else if (c == "v") s = s "\013"
		else if (c == "x" || c == "u" || c == "U") {
			cp = hexnum(c == "x" ? 2 : (c == "u" ? 4 : 8))
			if (cp < 0) return s
			if (cp >= 55296 && cp < 56320 && substr(fs, fp, 2) == "\\u") {
				fp += 2; lo = hexnum(4)
				if (lo >= 56320 && lo < 57344) cp = 65536 + (cp - 55296) * 1024 + (lo - 56320)
				else { err("unpaired surrogate in \\u escape"); continue }
			}
			if (cp == 0) { err("NUL characters are not supported"); continue }
			s = s utf8(cp)
		} else if (c == "0") err("NUL characters are not supported")
		else { err("unknown escape '\\" c "'"); s = s c }
	}
}

function hexnum(n,    v, i, d) {
	v = 0
	for (i = 0; i < n; i++) {
		d = index(HEX, tolower(substr(fs, fp + i, 1)))
		if (d == 0) { err("bad hex escape"); fp += i; return -1 }
		v = v * 16 + d - 1
	}
	fp += n
	return v
}

function utf8(cp) {
	if (cp < 128) return sprintf("%c", cp)
	if (cp < 2048) return sprintf("%c%c", 192 + int(cp / 64), 128 + cp % 64)
	if (cp < 65536) return sprintf("%c%c%c", 224 + int(cp / 4096), 128 + int(cp / 64) % 64, 128 + cp % 64)
	return sprintf("%c%c%c%c", 240 + int(cp / 262144), 128 + int(cp / 4096) % 64, 128 + int(cp / 64) % 64, 128 + cp % 64)
}
