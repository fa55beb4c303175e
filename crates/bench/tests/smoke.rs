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
        .args(["--gossip-settle-ms", "100"])
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
    for heading in ["== shutdown", "== mesh", "== memory", "== operations"] {
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
    }
    let round = &figures["mesh"]["rounds"][0];
    assert!(round["graceful"]["frames"].as_u64().expect("frames") > 0);
    assert!(round["crash"]["frames"].as_u64().expect("frames") > 0);
    assert!(round["graceful"]["bytes"].as_u64().expect("bytes") > 0);
    assert!(round["crash"]["bytes"].as_u64().expect("bytes") > 0);
    // The former neighbors' records settled: counted apart, or within the flood when the
    // settling delay is shorter than the wait for quiet (as here); either way a number.
    assert!(round["graceful"]["settled_frames"].as_u64().is_some());
    assert_eq!(figures["memory"]["neighbors"], 4);
    assert!(figures["memory"]["rss_after_kib"].as_u64().expect("rss") > 0);
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
