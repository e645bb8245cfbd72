//! A real browser for the console's tests (issue 19): Debian's own Chromium, headless,
//! driven over WebDriver (Debian's `chromium-driver`, with fantoccini), with axe-core's
//! accessibility check run in each page and a screenshot of each page kept.
//!
//! [`Browser`] is blocking: it owns a small tokio runtime for fantoccini, so tests stay on
//! plain threads like the rest of this crate. It starts `chromedriver` in a process group
//! of its own and ends that group (chromedriver and the Chromium it started) on drop.
//!
//! The console's self-signed certificate is trusted by its public key alone
//! (`--ignore-certificate-errors-spki-list`): what the fingerprint on the provisioning sheet
//! lets the staff check, and nothing wider.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// The npm package of axe-core, and the version pinned (installed by `cargo xtask test`
/// into the npm cache beside the FHIR schema).
pub const AXE_CORE_PACKAGE: &str = "axe-core";
pub const AXE_CORE_VERSION: &str = "4.11.0";
/// Debian's Chromium and its WebDriver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Where axe-core's script is, in the npm cache.
pub fn axe_core_script() -> Result<PathBuf, crate::fhir::SchemaError> {
    Ok(crate::fhir::npm_prefix()?
        .join("node_modules")
        .join(AXE_CORE_PACKAGE)
        .join("axe.min.js"))
}

/// Why the browser could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("cannot start {what}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("chromedriver did not take a session within {0:?}")]
    Session(Duration, #[source] fantoccini::error::NewSessionError),
    #[error(transparent)]
    WebDriver(#[from] fantoccini::error::CmdError),
    #[error("the browser does not show {text:?}; it shows:\n{page}")]
    NotShown { text: String, page: String },
    #[error("axe-core: {0}")]
    Axe(String),
    #[error("axe-core found serious or critical violations in page {page}: {violations:#?}")]
    Inaccessible {
        page: String,
        violations: Vec<Violation>,
    },
    #[error("{url} did not come to show what was waited for within {limit:?}; it shows:\n{page}")]
    NeverShown {
        url: String,
        limit: Duration,
        page: String,
    },
    #[error("cannot read or write {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An accessibility violation axe-core found.
#[derive(Debug, Clone)]
pub struct Violation {
    pub id: String,
    pub impact: Option<String>,
    pub help: String,
    pub nodes: usize,
}

impl Violation {
    /// What issue 19 does not allow: a serious or critical one.
    pub fn is_serious(&self) -> bool {
        matches!(self.impact.as_deref(), Some("serious" | "critical"))
    }
}

/// A headless Chromium under chromedriver.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    shots: PathBuf,
    taken: usize,
    axe: String,
}

impl Browser {
    /// Starts Chromium trusting the server certificate whose SubjectPublicKeyInfo has
    /// SHA-256 `spki_sha256` (base64), keeping screenshots in `shots`.
    pub fn start(spki_sha256: &str, shots: &Path) -> Result<Browser, BrowserError> {
        let axe_path = axe_core_script().map_err(|e| BrowserError::Axe(e.to_string()))?;
        let axe = std::fs::read_to_string(&axe_path).map_err(|source| BrowserError::File {
            path: axe_path.clone(),
            source,
        })?;
        std::fs::create_dir_all(shots).map_err(|source| BrowserError::File {
            path: shots.to_owned(),
            source,
        })?;
        let profile = tempfile::tempdir().map_err(|source| BrowserError::Start {
            what: "a Chromium profile directory",
            source,
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| BrowserError::Start {
                what: "chromedriver (no free port)",
                source,
            })?
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| BrowserError::Start {
                what: "chromedriver",
                source,
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| BrowserError::Start {
                what: "a tokio runtime",
                source,
            })?;
        let mut browser = Browser {
            rt,
            client: None,
            driver,
            _profile: profile,
            shots: shots.to_owned(),
            taken: 0,
            axe,
        };
        let args = serde_json::json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--lang=ja",
            "--accept-lang=ja",
            "--window-size=1100,900",
            format!("--user-data-dir={}", browser._profile.path().display()),
            format!("--ignore-certificate-errors-spki-list={spki_sha256}"),
        ]);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({ "binary": CHROMIUM, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let attempt = browser.rt.block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url),
            );
            match attempt {
                Ok(c) => break c,
                Err(e) if start.elapsed() > limit => return Err(BrowserError::Session(limit, e)),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        browser.client = Some(client);
        Ok(browser)
    }

    fn client(&self) -> &Client {
        match &self.client {
            Some(c) => c,
            None => unreachable!("the client is set when the browser has started"),
        }
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) -> Result<(), BrowserError> {
        Ok(self.rt.block_on(self.client().goto(url))?)
    }

    /// The current URL.
    pub fn url(&self) -> Result<String, BrowserError> {
        Ok(self.rt.block_on(self.client().current_url())?.to_string())
    }

    /// The page's source as the browser has it.
    pub fn source(&self) -> Result<String, BrowserError> {
        Ok(self.rt.block_on(self.client().source())?)
    }

    /// The page's source once it contains `text` (a click's navigation may still be under
    /// way when the click returns); an error with the page as it is after 10 s.
    pub fn wait_for(&self, text: &str) -> Result<String, BrowserError> {
        let start = Instant::now();
        loop {
            let page = self.source()?;
            if page.contains(text) {
                return Ok(page);
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(BrowserError::NotShown {
                    text: text.to_owned(),
                    page,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL once it ends with `end`; an error with the URL after 10 s.
    pub fn wait_for_url(&self, end: &str) -> Result<String, BrowserError> {
        let start = Instant::now();
        loop {
            let url = self.url()?;
            if url.ends_with(end) {
                return Ok(url);
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(BrowserError::NotShown {
                    text: format!("a URL ending {end}"),
                    page: url,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The visible text of the first element matching CSS `selector`.
    pub fn text(&self, selector: &str) -> Result<String, BrowserError> {
        let c = self.client();
        Ok(self
            .rt
            .block_on(async { c.find(Locator::Css(selector)).await?.text().await })?)
    }

    /// Types `text` into the field matching CSS `selector` (for a file input: a path).
    pub fn fill(&self, selector: &str, text: &str) -> Result<(), BrowserError> {
        let c = self.client();
        Ok(self.rt.block_on(async {
            let e = c.find(Locator::Css(selector)).await?;
            e.clear().await.ok();
            e.send_keys(text).await
        })?)
    }

    /// Sets the value of the input matching CSS `selector` as a picker would (a date
    /// input's `YYYY-MM-DD`, which typing enters in the locale's order).
    pub fn set_value(&self, selector: &str, value: &str) -> Result<(), BrowserError> {
        let c = self.client();
        Ok(self.rt.block_on(async {
            let e = c.find(Locator::Css(selector)).await?;
            let e = serde_json::to_value(e).map_err(fantoccini::error::CmdError::Json)?;
            c.execute(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'));",
                vec![e, serde_json::Value::String(value.to_owned())],
            )
            .await
            .map(|_| ())
        })?)
    }

    /// Picks the option whose text is `label` in the select matching CSS `selector`, as a
    /// person reads it.
    pub fn select(&self, selector: &str, label: &str) -> Result<(), BrowserError> {
        let c = self.client();
        Ok(self.rt.block_on(async {
            c.find(Locator::Css(selector))
                .await?
                .select_by_label(label)
                .await
        })?)
    }

    /// Clicks the checkbox or radio inside the label whose text is `label`, as a person
    /// picks it.
    pub fn check(&self, label: &str) -> Result<(), BrowserError> {
        let c = self.client();
        let xpath = format!("//label[normalize-space(.)='{label}']/input");
        Ok(self
            .rt
            .block_on(async { c.find(Locator::XPath(&xpath)).await?.click().await })?)
    }

    /// Clicks the element matching CSS `selector` (a radio, a checkbox, a button).
    pub fn click(&self, selector: &str) -> Result<(), BrowserError> {
        let c = self.client();
        Ok(self
            .rt
            .block_on(async { c.find(Locator::Css(selector)).await?.click().await })?)
    }

    /// Clicks the button whose text is `label`.
    pub fn press(&self, label: &str) -> Result<(), BrowserError> {
        let c = self.client();
        let xpath = format!("//button[normalize-space(.)='{label}']");
        Ok(self
            .rt
            .block_on(async { c.find(Locator::XPath(&xpath)).await?.click().await })?)
    }

    /// The value of cookie `name` for the current page, if set.
    pub fn cookie(&self, name: &str) -> Result<Option<String>, BrowserError> {
        let c = self.client();
        let all = self.rt.block_on(c.get_all_cookies())?;
        Ok(all
            .into_iter()
            .find(|k| k.name() == name)
            .map(|k| k.value().to_owned()))
    }

    /// Sets cookie `name` for the current page's site (Secure, Path=/, SameSite=Strict), as
    /// someone replaying a cookie value by hand would. (Through the page: chromedriver
    /// refuses WebDriver's Add Cookie without a domain, and a `__Host-` cookie may not have
    /// one.)
    pub fn set_cookie(&self, name: &str, value: &str) -> Result<(), BrowserError> {
        let c = self.client();
        Ok(self
            .rt
            .block_on(c.execute(
                "document.cookie = arguments[0] + '=' + arguments[1] + '; Secure; Path=/; SameSite=Strict';",
                vec![
                    serde_json::Value::String(name.to_owned()),
                    serde_json::Value::String(value.to_owned()),
                ],
            ))
            .map(|_| ())?)
    }

    /// Keeps a screenshot of the page as `NN-name.png`; returns its path.
    pub fn screenshot(&mut self, name: &str) -> Result<PathBuf, BrowserError> {
        self.taken += 1;
        let png = self.rt.block_on(self.client().screenshot())?;
        let path = self.shots.join(format!("{:02}-{name}.png", self.taken));
        std::fs::write(&path, png).map_err(|source| BrowserError::File {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Issue 19's look at a page: axe-core run in it (an error for a serious or critical
    /// violation) and its screenshot kept as `name`. A line for the test's output: how many
    /// minor or moderate violations, which, and where the screenshot is.
    pub fn look(&mut self, name: &str) -> Result<String, BrowserError> {
        let violations = self.axe()?;
        let serious: Vec<Violation> = violations
            .iter()
            .filter(|v| v.is_serious())
            .cloned()
            .collect();
        if !serious.is_empty() {
            return Err(BrowserError::Inaccessible {
                page: name.to_owned(),
                violations: serious,
            });
        }
        let shot = self.screenshot(name)?;
        Ok(format!(
            "{name}: {} minor or moderate{} ({})",
            violations.len(),
            violations
                .iter()
                .map(|v| format!(" {}", v.id))
                .collect::<String>(),
            shot.display()
        ))
    }

    /// Opens `url` again and again until `ok` says its page is as wanted, for at most
    /// `limit`; the page.
    pub fn reload_until(
        &self,
        url: &str,
        limit: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String, BrowserError> {
        let start = Instant::now();
        loop {
            self.goto(url)?;
            let page = self.source()?;
            if ok(&page) {
                return Ok(page);
            }
            if start.elapsed() > limit {
                return Err(BrowserError::NeverShown {
                    url: url.to_owned(),
                    limit,
                    page,
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs axe-core in the page; every violation it finds.
    pub fn axe(&self) -> Result<Vec<Violation>, BrowserError> {
        let c = self.client();
        let script = format!(
            "{}\n;const done = arguments[arguments.length - 1];\
             axe.run(document, {{ resultTypes: ['violations'] }})\
               .then(r => done(JSON.stringify(r.violations.map(v => ({{id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length}})))))\
               .catch(e => done('error: ' + e));",
            self.axe
        );
        let value = self.rt.block_on(c.execute_async(&script, Vec::new()))?;
        let text = value.as_str().unwrap_or_default();
        if let Some(e) = text.strip_prefix("error: ") {
            return Err(BrowserError::Axe(e.to_owned()));
        }
        let list: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| BrowserError::Axe(format!("{e}: {text}")))?;
        Ok(list
            .iter()
            .map(|v| Violation {
                id: v["id"].as_str().unwrap_or_default().to_owned(),
                impact: v["impact"].as_str().map(str::to_owned),
                help: v["help"].as_str().unwrap_or_default().to_owned(),
                nodes: usize::try_from(v["nodes"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX),
            })
            .collect())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        // chromedriver's group: chromedriver and the Chromium it started, if still there.
        if let Ok(id) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(id),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}
