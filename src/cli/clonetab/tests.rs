use super::*;

fn table(text: &str) -> Table {
    parse(text, Path::new("/etc/ublk-clonetab"))
}

#[test]
fn good_lines_comments_and_blanks() {
    let t = table(
        "# name source dest metadata options\n\
         \n\
         db  /srv/db.img  /dev/vg/db  /dev/vg/dbmd  region-size=64K,rate=100M,queues=2\n\
         web nbd+unix:///img?socket=/run/nbd.sock /dev/vg/web /dev/vg/webmd -   # trailing\n\
         \tlog /srv/log.img /dev/vg/log /dev/vg/logmd\n\
         ro /srv/ro.img /dev/vg/ro /dev/vg/romd no-hydration,buffered-io,no-recovery,no-zero-copy,\
         no-discard-passdown,depth=64,hydration-threshold=8,batch-size=4,source-timeout=5\n",
    );
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let names: Vec<&str> = t.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["db", "web", "log", "ro"]);
    let db = t.get("db").expect("db");
    assert_eq!(db.line, 3);
    assert_eq!(db.options.region_size, Some(64 << 10));
    assert_eq!(db.options.rate, 100 << 20);
    assert_eq!(db.options.queues, Some(2));
    assert_eq!(t.get("web").expect("web").options, Options::default());
    assert_eq!(t.get("log").expect("log").options, Options::default());
    let ro = &t.get("ro").expect("ro").options;
    assert!(ro.no_hydration && ro.buffered_io && ro.no_recovery && ro.no_discard_passdown);
    assert!(ro.no_zero_copy && t.get("ro").expect("ro").config().no_zero_copy);
    assert!(!t.get("db").expect("db").config().no_zero_copy);
    assert_eq!(
        (
            ro.depth,
            ro.hydration_threshold,
            ro.batch_size,
            ro.source_timeout
        ),
        (Some(64), Some(8), Some(4), Some(5))
    );
}

#[test]
fn options_map_onto_the_daemon_configuration() {
    let t = table(
        "ro /srv/ro.img /dev/vg/ro /dev/vg/romd no-hydration,rate=1M,depth=64,hydrate-when=idle\n",
    );
    let cfg = t.get("ro").expect("ro").config();
    assert_eq!(cfg.name.as_deref(), Some("ro"));
    assert_eq!(cfg.source, PathBuf::from("/srv/ro.img"));
    assert_eq!(cfg.dest, PathBuf::from("/dev/vg/ro"));
    assert_eq!(cfg.metadata, PathBuf::from("/dev/vg/romd"));
    assert!(cfg.no_hydration && !cfg.buffered_io);
    assert_eq!((cfg.rate, cfg.depth), (1 << 20, 64));
    assert_eq!(cfg.hydrate_when, crate::engine::HydrateWhen::Idle);
    // Nothing in a table can reformat.
    assert!(!cfg.force && !cfg.force_reformat_this_clone && !cfg.ignore_source_mismatch);
    assert_eq!(cfg.source_timeout, DEFAULT_SOURCE_TIMEOUT);
    assert!(cfg.validate().is_ok());
    let plain = table("p /srv/p.img /dev/vg/p /dev/vg/pmd\n");
    let cfg = plain.get("p").expect("p").config();
    assert_eq!((cfg.depth, cfg.rate, cfg.queues), (128, 0, None));
    assert_eq!(cfg.hydrate_when, crate::engine::HydrateWhen::Always);
}

/// Each bad line is reported with its file, line and field; the good lines still parse.
#[test]
fn every_bad_field_is_named() {
    let cases: &[(&str, &str, &str)] = &[
        ("a /s /d", "line", "3 columns"),
        ("a /s /d /m opt extra", "line", "6 columns"),
        ("-bad /s /d /m", "name", "starting with a letter"),
        ("12 /s /d /m", "name", "device number"),
        ("a/b /s /d /m", "name", "letters, digits"),
        ("a rel /d /m", "source", "absolute path or an NBD URI"),
        ("a nbds://h/e /d /m", "source", "TLS"),
        ("a nbd+unix:///e?socket=rel /d /m", "source", "socket"),
        ("a /s d /m", "destination", "absolute path"),
        ("a /s /d m", "metadata", "absolute path"),
        (
            "a /s /d /m frobnicate",
            "options",
            "unknown option 'frobnicate'",
        ),
        ("a /s /d /m region-size=huge", "options", "'region-size'"),
        ("a /s /d /m rate", "options", "'rate' needs a value"),
        (
            "a /s /d /m hydrate-when=sometimes",
            "options",
            "unknown hydration policy 'sometimes'",
        ),
        ("a /s /d /m no-hydration=yes", "options", "takes no value"),
        ("a /s /d /m queues=70000", "options", "too large"),
        ("a /s /d /m depth=-1", "options", "whole number"),
        ("a /s /d /m depth=0", "options", "between 1 and 4096"),
        ("a /s /d /m region-size=3000", "options", "power of two"),
        ("a /s /d /m queues=0", "options", "at least one queue"),
        (
            "a nbd://h/e /d /m source-timeout=0",
            "options",
            "at least 1 second",
        ),
        ("a /s /d /m rate=1M,rate=2M", "options", "given twice"),
    ];
    for (line, field, says) in cases {
        let t = table(&format!("good /s /d /gm\n{line}\n"));
        assert_eq!(t.entries.len(), 1, "{line}: the good line still parses");
        assert_eq!(t.errors.len(), 1, "{line}: {:?}", t.errors);
        let e = &t.errors[0];
        assert_eq!((e.line, e.field.as_str()), (2, *field), "{line}: {e}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("/etc/ublk-clonetab:2: {field}: ")) && text.contains(says),
            "{line}: {text}"
        );
    }
}

#[test]
fn duplicates_are_refused_on_the_later_line() {
    let t = table(
        "a /s1 /d1 /m1\n\
         a /s2 /d2 /m2\n\
         b /s3 /d3 /m1\n\
         c /s4 /d4 /m4\n",
    );
    let names: Vec<&str> = t.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    let errs: Vec<String> = t.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].contains(":2: name: 'a' is already on line 1"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains(":3: metadata: /m1 is already used on line 1"),
        "{errs:?}"
    );
}
