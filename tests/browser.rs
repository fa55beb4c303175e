//! The headless-browser harness of `tests/support/browser.rs`, checked on its own: it starts
//! Chromium, opens a page served by the test, evaluates script, takes a screenshot, and kills
//! the browser at the end.

mod support;

use serde_json::json;
use support::browser::{Browser, PageServer};

#[tokio::test]
async fn the_harness_opens_a_page_evaluates_script_and_takes_a_screenshot() {
    let Some(browser) = Browser::launch(&[]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");
    let page = PageServer::start(
        "<!doctype html><title>harness</title><p id=p>hello</p>\
         <script>window.answer = new Promise(r => setTimeout(() => r({n: 42}), 10));</script>"
            .to_owned(),
    )
    .await;
    browser
        .goto(&format!("http://{}/", page.addr))
        .await
        .expect("the page opens");
    let title = browser.eval("document.title").await.expect("evaluated");
    assert_eq!(title, json!("harness"));
    // A promise is awaited, and objects come back as JSON.
    let answer = browser.eval("window.answer").await.expect("evaluated");
    assert_eq!(answer, json!({ "n": 42 }));
    browser
        .eventually("document.getElementById('p').textContent === 'hello'")
        .await
        .expect("the paragraph is there");
    // A thrown error is an error, not a value.
    let thrown = browser.eval("(() => { throw new Error('boom') })()").await;
    assert!(
        matches!(&thrown, Err(support::browser::BrowserError::Script(m)) if m.contains("boom")),
        "{thrown:?}"
    );
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 100, "a PNG of a page, not an empty one");
    // A page that cannot be reached is an error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let refused = closed.local_addr().expect("bound");
    drop(closed);
    assert!(browser.goto(&format!("http://{refused}/")).await.is_err());
}
