//! JSON written byte-for-byte as Python's `json.dump(obj, f, indent=4)` writes it.
//!
//! SimPO's scripts exchange files made that way; writing them identically lets
//! users diff prefgen's files against theirs. Python's defaults differ from
//! serde_json's in two places: `ensure_ascii=True` escapes everything outside
//! printable ASCII as `\uXXXX` (surrogate pairs above the BMP), and floats are
//! written as `repr(float)` (`1.0`, `1e-05`, `1e+16`, `NaN`).

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use std::io::{self, Write};

/// Serialises a list of rows as `json.dump(rows, f, indent=4)` would. Rows
/// are formatted in parallel chunks (each at indent depth 1) and joined with
/// Python's separators; `size_hint` (about the output's size) saves regrowing
/// a buffer of hundreds of MB.
pub fn to_vec<T: Serialize + Sync>(rows: &[T], size_hint: usize) -> serde_json::Result<Vec<u8>> {
    if rows.is_empty() {
        return Ok(b"[]".to_vec());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.len());
    let per = rows.len().div_ceil(threads);
    let parts: Vec<serde_json::Result<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            rows.chunks(per).map(|chunk| scope.spawn(move || rows_at_depth_one(chunk, size_hint / threads))).collect();
        handles.into_iter().map(|h| h.join().expect("serialising does not panic")).collect()
    });
    let mut out = Vec::with_capacity(size_hint + 16);
    out.push(b'[');
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&part?);
    }
    out.extend_from_slice(b"\n]");
    Ok(out)
}

/// `\n    row,\n    row` for rows of a top-level list.
fn rows_at_depth_one<T: Serialize>(rows: &[T], size_hint: usize) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size_hint.max(1 << 16));
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"\n    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter { depth: 1, has_value: false });
        row.serialize(&mut ser)?;
    }
    Ok(out)
}

/// `repr(x)` of a Python float.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, as Python's repr does;
    // only the layout differs.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut s = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.extend(std::iter::repeat_n('0', int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        } else {
            s.push_str("0.");
            s.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            s.push_str(&digits);
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        s.push_str(&format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()));
    }
    s
}

/// `indent=4` with separators (',', ': '), `[]`/`{}` for empty containers,
/// `ensure_ascii` strings and Python float reprs.
struct PythonFormatter {
    depth: usize,
    has_value: bool,
}

impl PythonFormatter {
    fn newline<W: ?Sized + Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.depth {
            w.write_all(b"    ")?;
        }
        Ok(())
    }

    fn open<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(bracket)
    }

    fn item<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }
}

impl Formatter for PythonFormatter {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(float_repr(value).as_bytes())
    }
    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, value as f64)
    }
    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // serde_json has already escaped quotes, backslashes and C0 controls;
        // what is left to escape for `ensure_ascii` is DEL and non-ASCII.
        // Scanning bytes keeps the common all-ASCII case a single copy.
        let bytes = fragment.as_bytes();
        let (mut start, mut i) = (0, 0);
        while i < bytes.len() {
            if bytes[i].wrapping_sub(b' ') < 0x5f {
                i += 1;
                continue;
            }
            w.write_all(&bytes[start..i])?;
            let c = fragment[i..].chars().next().expect("i is at a char boundary");
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            i += c.len_utf8();
            start = i;
        }
        w.write_all(&bytes[start..])
    }
    fn write_char_escape<W: ?Sized + Write>(&mut self, w: &mut W, escape: CharEscape) -> io::Result<()> {
        // Python never escapes '/', and serde_json never asks it to; the rest agree.
        match escape {
            CharEscape::AsciiControl(byte) => write!(w, "\\u{:04x}", byte),
            other => serde_json::ser::CompactFormatter.write_char_escape(w, other),
        }
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        // Pairs are (value, Python's repr(value)).
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (-2.5e-7, "-2.5e-07"),
            (0.1234000027179718, "0.1234000027179718"),
            (100.0, "100.0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "repr of {x:e}");
        }
    }

    #[test]
    fn strings_and_layout_match_json_dump() {
        let v = [serde_json::json!({"a": "é😀\u{7f}\"\\\n\u{1}/", "b": [], "c": [1.0, 2], "d": {}})];
        let got = String::from_utf8(to_vec(&v, 0).unwrap()).unwrap();
        let want = "[\n    {\n        \"a\": \"\\u00e9\\ud83d\\ude00\\u007f\\\"\\\\\\n\\u0001/\",\n        \"b\": [],\n        \"c\": [\n            1.0,\n            2\n        ],\n        \"d\": {}\n    }\n]";
        assert_eq!(got, want);
    }

    #[test]
    fn parallel_chunks_join_like_one_list() {
        // json.dumps([[1], [], [2, 3], ...], indent=4), whatever the chunking.
        let rows: Vec<Vec<u32>> = (0..7).map(|i| (0..i % 3).collect()).collect();
        let got = String::from_utf8(to_vec(&rows, 0).unwrap()).unwrap();
        let want = "[\n    [],\n    [\n        0\n    ],\n    [\n        0,\n        1\n    ],\n    [],\n    [\n        0\n    ],\n    [\n        0,\n        1\n    ],\n    []\n]";
        assert_eq!(got, want);
        assert_eq!(to_vec::<u8>(&[], 0).unwrap(), b"[]");
    }
}
