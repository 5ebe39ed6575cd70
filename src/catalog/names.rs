//! Directory entry names for snapshots, which may be empty, duplicated,
//! contain `/`, or equal another snapshot's ID (research note A.8).
//!
//! The rule (documented in the README):
//! 1. A snapshot's entry is its name when the name is non-empty, unique among
//!    the snapshots, equal to no other snapshot's ID, and needs no escaping.
//! 2. Otherwise it is `<id>-<escaped name>`, or just `<id>` for an empty name.
//! 3. Escaping: `/`, `%`, control characters, bytes that are not UTF-8, and a
//!    leading `.` are written as `%XX` (hex of the byte).
//! 4. If two entries still coincide (hostile tables can repeat IDs), or an
//!    entry would pass 255 bytes, the entry gets `~<n>`, n being the
//!    snapshot's 1-based position in the table (shortened to fit).
//!
//! Everything depends only on the snapshot table, so names are stable from
//! mount to mount.

use std::collections::HashMap;

/// Longest name Linux accepts for one path component.
const NAME_MAX: usize = 255;

/// Escapes bytes that cannot (or should not) stand in a file name.
pub fn escape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    let mut first = true;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (v, b) = rest.split_at(e.valid_up_to());
                (std::str::from_utf8(v).unwrap(), b)
            }
        };
        for c in valid.chars() {
            if c == '/' || c == '%' || c.is_control() || (first && c == '.') {
                let mut tmp = [0u8; 4];
                for b in c.encode_utf8(&mut tmp).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            } else {
                out.push(c);
            }
            first = false;
        }
        match bad.first() {
            Some(b) => {
                out.push_str(&format!("%{b:02X}"));
                rest = &bad[1..];
                first = false;
            }
            None => break,
        }
    }
    out
}

/// Entry names for snapshots given as (id, name) in table order.
pub fn snapshot_entries(snaps: &[(&str, &[u8])]) -> Vec<String> {
    let mut name_count: HashMap<&[u8], usize> = HashMap::new();
    let mut id_count: HashMap<&[u8], usize> = HashMap::new();
    for (id, name) in snaps {
        *name_count.entry(name).or_default() += 1;
        *id_count.entry(id.as_bytes()).or_default() += 1;
    }
    let id_form = |id: &str, name: &[u8]| {
        if name.is_empty() {
            escape(id.as_bytes())
        } else {
            format!("{}-{}", escape(id.as_bytes()), escape(name))
        }
    };
    let mut entries: Vec<(String, bool)> = snaps
        .iter()
        .map(|&(id, name)| {
            // Another snapshot's ID (its own ID may equal its name).
            let same_id = usize::from(id.as_bytes() == name);
            let clashes_with_id = id_count.get(name).copied().unwrap_or(0) > same_id;
            let plain = !name.is_empty()
                && name_count[name] == 1
                && !clashes_with_id
                && escape(name).as_bytes() == name
                && name.len() <= NAME_MAX;
            if plain {
                (escape(name), true)
            } else {
                (id_form(id, name), false)
            }
        })
        .collect();
    // A plain name can still equal another snapshot's ID form: such plain
    // names take the ID form too.
    let counts = count(&entries);
    for (i, e) in entries.iter_mut().enumerate() {
        if e.1 && counts[&e.0] > 1 {
            *e = (id_form(snaps[i].0, snaps[i].1), false);
        }
    }
    let counts = count(&entries);
    let suffixed: Vec<String> = entries
        .into_iter()
        .enumerate()
        .map(
            |(i, (e, _))| {
                if counts[&e] > 1 || e.len() > NAME_MAX {
                    with_suffix(&e, &format!("~{}", i + 1))
                } else {
                    e
                }
            },
        )
        .collect();
    // A suffixed entry can still meet a name that already ends that way
    // (only in hostile tables): the later one gets another suffix.
    let mut used = std::collections::HashSet::new();
    suffixed
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let mut name = e.clone();
            let mut k = 2;
            while !used.insert(name.clone()) {
                name = with_suffix(&e, &format!("~{}~{k}", i + 1));
                k += 1;
            }
            name
        })
        .collect()
}

/// `base` shortened so that `base + suffix` fits a file name.
fn with_suffix(base: &str, suffix: &str) -> String {
    format!("{}{suffix}", truncate(base, NAME_MAX - suffix.len()))
}

fn count(entries: &[(String, bool)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (e, _) in entries {
        *counts.entry(e.clone()).or_default() += 1;
    }
    counts
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(snaps: &[(&str, &str)]) -> Vec<String> {
        let raw: Vec<(&str, &[u8])> = snaps.iter().map(|(i, n)| (*i, n.as_bytes())).collect();
        snapshot_entries(&raw)
    }

    #[test]
    fn odd_names_get_unique_readable_entries() {
        let got = entries(&[
            ("1", "clean"),
            ("2", "same"),
            ("3", "same"),
            ("4", "a/b"),
            ("5", ""),
            ("6", "1"),
            ("7", "héllo wörld"),
            ("8", ".hidden"),
        ]);
        assert_eq!(got, ["clean", "2-same", "3-same", "4-a%2Fb", "5", "6-1", "héllo wörld", "8-%2Ehidden"]);
    }

    #[test]
    fn a_plain_name_that_equals_an_id_form_yields() {
        let got = entries(&[("1", "x"), ("2", "x"), ("3", "1-x")]);
        assert_eq!(got, ["1-x", "2-x", "3-1-x"]);
        let mut sorted = got.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 3);
    }

    #[test]
    fn duplicate_ids_and_long_names_stay_unique_and_short() {
        let long = "n".repeat(255);
        let got = entries(&[("1", ""), ("1", ""), ("2", &long), ("3", &long)]);
        assert_eq!(got[0], "1~1");
        assert_eq!(got[1], "1~2");
        assert!(got[2].len() <= 255 && got[3].len() <= 255 && got[2] != got[3]);
    }

    #[test]
    fn repeated_ids_never_collide() {
        let got = entries(&[("1", "x~3"), ("x", ""), ("x", "")]);
        let unique: std::collections::HashSet<_> = got.iter().collect();
        assert_eq!(unique.len(), 3, "{got:?}");
    }

    #[test]
    fn invalid_utf8_is_escaped() {
        assert_eq!(escape(b"a\xffb%"), "a%FFb%25");
        assert_eq!(escape(b".."), "%2E.");
    }
}
