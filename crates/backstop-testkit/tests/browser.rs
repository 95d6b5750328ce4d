//! The browser harness itself: a page served by an in-test axum server,
//! read, clicked through and photographed in headless Chromium.

use axum::Router;
use axum::response::Html;
use axum::routing::{get, post};
use backstop_testkit::browser::Browser;

/// The PNG's width and height, from its IHDR chunk; panics on anything else.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "not a PNG ({} bytes)",
        bytes.len()
    );
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_page_is_read_submitted_and_photographed() {
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                Html(
                    "<!doctype html><title>harness</title>\
                     <h1 id=greeting>Hello from axum</h1>\
                     <form id=f method=post action=/done>\
                     <input id=name name=name><button id=go>Go</button></form>",
                )
            }),
        )
        .route(
            "/done",
            post(|body: String| async move {
                Html(format!(
                    "<!doctype html><title>done</title><p id=echo>{}</p>",
                    body.replace('<', "&lt;")
                ))
            }),
        );
    let base = backstop_testkit::serve_http(app).await;
    let browser = Browser::start("harness").await;
    browser.open(&format!("{base}/")).await;
    assert_eq!(browser.title().await.expect("title"), "harness");
    assert_eq!(browser.text("#greeting").await, "Hello from axum");
    let first = browser.screenshot("page").await;
    browser.fill("#name", "chromium").await;
    browser.click("#go").await;
    assert_eq!(browser.text("#echo").await, "name=chromium");
    assert_eq!(browser.title().await.expect("title"), "done");
    let second = browser.screenshot_full("done").await;

    for (path, name) in [(&first, "page.png"), (&second, "done.png")] {
        assert_eq!(path.parent(), Some(browser.dir()));
        assert!(
            path.ends_with(format!("console-screenshots/harness/{name}")),
            "{path:?}"
        );
        let bytes = std::fs::read(path).expect("the screenshot file");
        let (width, height) = png_size(&bytes);
        assert_eq!(width, 1280, "{path:?}");
        assert!(height >= 800, "{path:?}: {width}x{height}");
    }
    browser.close().await;
}
