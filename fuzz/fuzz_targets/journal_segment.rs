//! Fuzzes the journal's segment scanner (what recovery runs on every segment file):
//! arbitrary bytes never panic, the valid prefix is within the file and made of
//! records in sequence, and damage is reported at the end of that prefix.
#![no_main]

use drover_journal::Limits;
use drover_journal::scan::scan_segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_message: 1 << 16, max_record: 1 << 16, max_checkpoint: 1 << 20 };
    // The committer id the first header names (so seeds from real journals scan as
    // records), and another.
    let first = data.get(..4).map_or(0, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    for committer in [first, 7] {
        let scan = scan_segment(data, committer, 0, &limits);
        assert!(scan.valid_len <= data.len());
        let mut expect = 0;
        let mut end = 0;
        for r in &scan.records {
            assert_eq!(r.seq, expect);
            assert_eq!(r.offset, end);
            assert!(r.payload.end <= scan.valid_len);
            end = r.payload.end;
            expect += 1;
        }
        assert_eq!(end, scan.valid_len);
        if let Some(found) = &scan.damage {
            assert_eq!(found.offset, scan.valid_len);
            if let Some((at, _)) = found.resync {
                assert!(at > found.offset && at < data.len());
            }
        } else {
            assert_eq!(scan.valid_len, data.len());
        }
    }
});
