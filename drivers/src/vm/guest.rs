//! Reading the test guest's progress: its counter in guest RAM (HMP `xp`
//! over QMP) and the last `counter N` line of its serial console log.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Parse the output of `xp /1gx ADDR`, e.g.
/// `0000000000009000: 0x000000000001e746\r\n`.
pub fn parse_xp(out: &str, addr: u64) -> Option<u64> {
    let line = out.lines().find(|l| l.contains(':'))?;
    let (a, v) = line.split_once(':')?;
    if u64::from_str_radix(a.trim().trim_start_matches("0x"), 16).ok()? != addr {
        return None;
    }
    let v = v.split_whitespace().next()?;
    u64::from_str_radix(v.strip_prefix("0x")?, 16).ok()
}

/// The number on the last complete `counter N` line of `text`.
pub fn last_counter_line(text: &str) -> Option<u64> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return None,
    };
    complete.lines().rev().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("counter ")
            .and_then(|n| n.trim().parse().ok())
    })
}

/// Last `counter N` of a console log (reads only its tail).
pub fn console_counter(path: &Path) -> std::io::Result<Option<u64>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(last_counter_line(&String::from_utf8_lossy(&buf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xp_output() {
        assert_eq!(
            parse_xp("0000000000009000: 0x000000000001e746\r\n", 0x9000),
            Some(0x1e746)
        );
        assert_eq!(
            parse_xp("0000000000009000: 0x0000000000000000\n", 0x9000),
            Some(0)
        );
        assert_eq!(
            parse_xp("0000000000008000: 0x0000000000000005\n", 0x9000),
            None
        );
        assert_eq!(parse_xp("Cannot access memory\n", 0x9000), None);
        assert_eq!(parse_xp("", 0x9000), None);
    }

    #[test]
    fn console_lines() {
        assert_eq!(last_counter_line("counter 0\ncounter 12\ncoun"), Some(12));
        assert_eq!(last_counter_line("counter 0\ncounter 12\n"), Some(12));
        assert_eq!(
            last_counter_line("counter 7\ntestvm: exception 0D 00\n"),
            Some(7)
        );
        assert_eq!(last_counter_line("counter 1"), None);
        assert_eq!(last_counter_line(""), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        assert_eq!(console_counter(&p).unwrap(), None);
        let mut s = String::new();
        for i in 0..2000 {
            s.push_str(&format!("counter {i}\n"));
        }
        std::fs::write(&p, s).unwrap();
        assert_eq!(console_counter(&p).unwrap(), Some(1999));
    }
}
