//! A real headless Chromium driven over WebDriver (W3C WebDriver, through
//! the `fantoccini` client): `chromedriver` is started on an ephemeral
//! 127.0.0.1 port, and it starts Chromium with a fresh profile. Debian
//! packages: `chromium` and `chromium-driver` (`.ci/run` installs them).
//!
//! Both run in their own process group, which is killed on drop, so a
//! failing test leaves no browser behind.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use crate::WAIT;

/// A WebDriver session in headless Chromium.
#[derive(Debug)]
pub struct Browser {
    /// The session.
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start `chromedriver --port=0` and open a session with a 1280×900
    /// window. Panics, naming the Debian packages, when either binary is
    /// missing.
    pub async fn start() -> Self {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("no Chromium: apt-get install chromium chromium-driver");
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("no chromedriver: apt-get install chromium-driver");
        let port = announced_port(&mut driver);
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Root in CI: Chromium's sandbox refuses to run as root.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session");
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Wait up to [`WAIT`] until `script` (the body of a function, run in
    /// the page) returns `true`; panics with `what` and the page's text
    /// otherwise.
    pub async fn wait_for(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let done = self.client.execute(script, vec![]).await.expect(what);
            if done == serde_json::Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; page:\n{}", self.text().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Click the element matching CSS selector `css`; panics naming it if
    /// it is missing or the click fails.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        }
    }

    /// End the session (Chromium exits) and stop chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The port from chromedriver's `... started successfully on port N.` line.
fn announced_port(driver: &mut Child) -> u16 {
    let stdout = driver.stdout.take().expect("chromedriver stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("on port ").nth(1) {
                let port = rest.trim_end_matches('.').trim().parse::<u16>();
                // "Starting ChromeDriver ... on port 0" comes first.
                if let Ok(port @ 1..) = port {
                    let _ = tx.send(port);
                }
            }
        }
    });
    match rx.recv_timeout(WAIT) {
        Ok(port) => port,
        Err(e) => {
            let _ = driver.kill();
            panic!("chromedriver did not report its port: {e}");
        }
    }
}
