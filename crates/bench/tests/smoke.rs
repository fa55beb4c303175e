//! Every scenario of the benchmark at a tiny size, so that it cannot rot. Correctness only:
//! nothing here judges a time.

use std::process::Command;

#[test]
fn every_scenario_runs_at_a_tiny_size_and_writes_its_figures() {
    let dir = std::env::temp_dir().join(format!("meshnode-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, svg) = (dir.join("figures.json"), dir.join("plot.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_meshnode-bench"))
        .args([
            "--neighbors",
            "2,4",
            "--repeat",
            "1",
            "--mesh-nodes",
            "6",
            "--degree",
            "3",
        ])
        .args(["--rounds", "1", "--memory-neighbors", "4"])
        .args(["--ops-records", "20", "--ops-scrapes", "3"])
        .args(["--flood-nodes", "3", "--flood-records", "40"])
        .args(["--handshakes", "8"])
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for heading in [
        "== shutdown",
        "== mesh",
        "== memory",
        "== handshake",
        "== operations",
        "== flood",
    ] {
        assert!(stdout.contains(heading), "{heading} missing:\n{stdout}");
    }

    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    let points = figures["shutdown"].as_array().expect("shutdown points");
    assert_eq!(points.len(), 2);
    for (point, n) in points.iter().zip([2, 4]) {
        assert_eq!(point["neighbors"], n);
        assert_eq!(
            point["frames_sent"],
            serde_json::json!([n]),
            "one withdrawal frame per neighbor"
        );
        assert_eq!(point["all_graceful"], true);
        assert!(point["eof_ms"]["median"].as_f64().expect("a time") > 0.0);
        assert!(point["floor_eof_ms"]["median"].as_f64().expect("a time") > 0.0);
        assert!(
            point["plain_floor_eof_ms"]["median"]
                .as_f64()
                .expect("a time")
                > 0.0
        );
        let rounds = point["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 1, "one round per repeat");
        assert!(rounds[0]["ratio"].as_f64().expect("a ratio") > 0.0);
    }
    let round = &figures["mesh"]["rounds"][0];
    assert!(round["graceful"]["frames"].as_u64().expect("frames") > 0);
    assert!(round["crash"]["frames"].as_u64().expect("frames") > 0);
    assert!(round["graceful"]["bytes"].as_u64().expect("bytes") > 0);
    assert!(round["crash"]["bytes"].as_u64().expect("bytes") > 0);
    // The former neighbors' own records wait for their next change: nothing more leaves.
    assert!(round["graceful"]["settled_frames"].as_u64().is_some());
    let flood = &figures["flood"];
    assert_eq!(flood["records"], 40);
    assert_eq!(flood["died_down"], true);
    let attacked = &flood["per_node"][0];
    assert_eq!(attacked["hops"], 0);
    assert!(
        attacked["accepted"].as_u64().expect("accepted") >= 40,
        "every fresh record is stored at this size: {attacked}"
    );
    for join in ["join_quiet", "join_flood"] {
        assert_eq!(flood[join]["reached"], flood[join]["nodes"], "{join}");
        assert_eq!(flood[join]["full_everywhere"], true, "{join}");
    }
    assert_eq!(figures["memory"]["neighbors"], 4);
    assert!(figures["memory"]["rss_after_kib"].as_u64().expect("rss") > 0);
    assert_eq!(figures["handshake"]["handshakes"], 8);
    assert!(figures["handshake"]["per_second"].as_f64().expect("a rate") > 0.0);
    let ops = &figures["operations"];
    assert_eq!(ops["connectivity"][0]["records"], 20);
    assert!(ops["scrape_bytes"].as_u64().expect("bytes") > 0);
    assert_eq!(
        ops["scrape_ms"]["samples"]
            .as_array()
            .expect("samples")
            .len(),
        3
    );
    assert!(figures["failed"].as_array().expect("failures").is_empty());
    let plot = std::fs::read_to_string(&svg).expect("SVG written");
    assert!(plot.contains("<svg"), "an SVG");
    let _ = std::fs::remove_dir_all(&dir);
}
