//! The chat page in a real browser: headless Chromium driven through
//! chromedriver (WebDriver) opens the page with a token, picks the echo
//! agent, sends a message over the page's WebSocket and sees the streamed
//! reply and the final state appear; then answers a planner's ask-user
//! prompt in its form and stops a long task with the Cancel button.

use anyhow::{Context as _, Result, ensure};
use byclaw_bridge::BridgeToken;
use fantoccini::{ClientBuilder, Locator};
use integration_tests::*;
use serde_json::json;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, killed on drop.
async fn chromedriver() -> Result<(tokio::process::Child, u16)> {
    for path in [CHROMIUM, CHROMEDRIVER] {
        ensure!(
            Path::new(path).exists(),
            "{path} is missing: this test needs Debian's chromium and chromium-driver \
             (apt-get install -y chromium chromium-driver; .ci/run does it)"
        );
    }
    let port = free_port();
    let child = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting chromedriver")?;
    let http = reqwest::Client::new();
    let status = format!("http://127.0.0.1:{port}/status");
    wait_for("chromedriver to answer /status", WAIT, || {
        let request = http.get(&status).send();
        async move { Ok(request.await.ok().filter(|r| r.status() == 200).map(drop)) }
    })
    .await?;
    Ok((child, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_streams_a_reply_in_chromium() -> Result<()> {
    let (mut driver, driver_port) = chromedriver().await?;
    const TOKEN: &str = "browser-test-token-0123456789";
    let port = free_port();
    let mut bed = TestBed::start(&["echo"], "echo", |config| {
        config.bridge.enabled = true;
        config.bridge.listen = ([127, 0, 0, 1], port).into();
        config.bridge.tokens = vec![BridgeToken {
            token: TOKEN.into(),
            tenant: "web".into(),
            session_prefix: "web-".into(),
            max_streams: None,
            messages_per_s: None,
        }];
    })
    .await?;

    let (browser, _profile) = browser(driver_port).await?;
    let result = async {
        browser
            .goto(&format!("http://127.0.0.1:{port}/?token={TOKEN}"))
            .await?;
        let wait = || waiting(&browser);
        wait()
            .for_element(Locator::Css("#agent option[value='echo']"))
            .await
            .context("the agent list")?;
        browser
            .find(Locator::Css("#agent"))
            .await?
            .select_by_value("echo")
            .await?;
        wait()
            .for_element(Locator::Css("#status.on"))
            .await
            .context("the page's WebSocket to connect")?;
        let session = browser.find(Locator::Css("#session")).await?.text().await?;
        assert!(session.starts_with("web-"), "{session}");

        let text = "hello from a real browser";
        browser
            .find(Locator::Css("#input"))
            .await?
            .send_keys(text)
            .await?;
        browser.find(Locator::Css("#send")).await?.click().await?;

        // The streamed chunks add up to the reply; the task ends COMPLETED.
        let shown = wait_for("the reply in the page", WAIT, || {
            let browser = browser.clone();
            async move {
                let Ok(state) = browser.find(Locator::Css(".task .state")).await else {
                    return Ok(None);
                };
                if state.text().await? != "COMPLETED" {
                    return Ok(None);
                }
                let reply = browser.find(Locator::Css(".task .reply")).await?;
                Ok(Some(reply.text().await?))
            }
        })
        .await?;
        assert_eq!(shown, text);
        let user = browser
            .find(Locator::Css(".msg.user"))
            .await?
            .text()
            .await?;
        assert_eq!(user, text);
        // What the page showed is what the data stream holds.
        let events = all_events(&mut bed.conn.clone(), &session).await?;
        let streamed: String = events
            .iter()
            .filter(|e| e["data"]["contentType"] == "1002")
            .map(delta_content)
            .collect();
        assert_eq!(streamed, text);
        anyhow::Ok(())
    }
    .await;
    browser.close().await.ok();
    bed.daemon.stop().await?;
    driver.kill().await.ok();
    result
}

/// A headless Chromium session; its profile directory lives as long as the
/// returned guard.
async fn browser(driver_port: u16) -> Result<(fantoccini::Client, tempfile::TempDir)> {
    let profile = tempfile::tempdir()?;
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .context("starting a Chromium session through chromedriver")?;
    Ok((browser, profile))
}

/// A wait for something in the page: up to [`WAIT`], looking every 50 ms.
fn waiting(browser: &fantoccini::Client) -> fantoccini::wait::Wait<'_> {
    browser
        .wait()
        .at_most(WAIT)
        .every(Duration::from_millis(50))
}

/// The task bubbles of one agent in the page: (state, reply text) each.
async fn tasks_of(browser: &fantoccini::Client, agent: &str) -> Result<Vec<(String, String)>> {
    let found = browser
        .execute(
            "return [...document.querySelectorAll('.task')]
                .filter((t) => t.querySelector('.agent').textContent === arguments[0])
                .map((t) => [t.querySelector('.state').textContent, t.querySelector('.reply').textContent]);",
            vec![json!(agent)],
        )
        .await?;
    Ok(serde_json::from_value(found)?)
}

/// Waits until the page shows a task of `agent` in `state`; its reply.
async fn wait_task_state(browser: &fantoccini::Client, agent: &str, state: &str) -> Result<String> {
    wait_for(
        &format!("a {agent} task {state} in the page"),
        WAIT,
        || async {
            Ok(tasks_of(browser, agent)
                .await?
                .into_iter()
                .find(|(s, _)| s == state)
                .map(|(_, reply)| reply))
        },
    )
    .await
}

/// Picks `agent`, types `text` and sends it.
async fn send_from_page(browser: &fantoccini::Client, agent: &str, text: &str) -> Result<()> {
    browser
        .find(Locator::Css("#agent"))
        .await?
        .select_by_value(agent)
        .await?;
    browser
        .find(Locator::Css("#input"))
        .await?
        .send_keys(text)
        .await?;
    browser.find(Locator::Css("#send")).await?.click().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_answers_a_prompt_and_cancels_a_task_in_chromium() -> Result<()> {
    let (mut driver, driver_port) = chromedriver().await?;
    let port = free_port();
    let mut bed = TestBed::start(
        &["planner", "translator", "researcher", "tools", "faults"],
        "planner",
        |config| {
            config.bridge.enabled = true;
            config.bridge.listen = ([127, 0, 0, 1], port).into();
            config.plugins.deadline_s = 60;
        },
    )
    .await?;
    let (browser, _profile) = browser(driver_port).await?;
    let result = async {
        browser.set_window_size(1024, 760).await?;
        browser.goto(&format!("http://127.0.0.1:{port}/")).await?;
        let wait = || waiting(&browser);
        wait()
            .for_element(Locator::Css("#agent option[value='slow']"))
            .await
            .context("the agent list")?;
        wait().for_element(Locator::Css("#status.on")).await?;

        // The planner asks which aspect to focus on; answer in its form.
        send_from_page(&browser, "planner", "good morning world").await?;
        let answer = wait()
            .for_element(Locator::Css(".task .ask textarea"))
            .await
            .context("the ask-user form")?;
        let prompt = browser
            .find(Locator::Css(".task .ask .prompt"))
            .await?
            .text()
            .await?;
        assert!(prompt.contains("focus on"), "{prompt}");
        answer.send_keys("risks").await?;
        browser
            .find(Locator::Css(".task .ask button"))
            .await?
            .click()
            .await?;
        let reply = wait_task_state(&browser, "planner", "COMPLETED").await?;
        assert!(reply.contains("Focus: risks."), "{reply}");
        // README's picture of the page: BYCLAW_SCREENSHOT=docs/chat-page.png.
        if let Some(path) = std::env::var_os("BYCLAW_SCREENSHOT") {
            std::fs::write(&path, browser.screenshot().await?)?;
        }
        assert!(
            browser.find_all(Locator::Css(".ask")).await?.is_empty(),
            "the form goes when the task ends"
        );

        // A long task, stopped with the Cancel button.
        send_from_page(&browser, "slow", "20000").await?;
        wait()
            .for_element(Locator::Css("#cancel:not([disabled])"))
            .await
            .context("the cancel button to be enabled")?;
        wait_for("the slow task to start", WAIT, || async {
            Ok((!tasks_of(&browser, "slow").await?.is_empty()).then_some(()))
        })
        .await?;
        browser.find(Locator::Css("#cancel")).await?.click().await?;
        wait_task_state(&browser, "slow", "CANCELLED").await?;
        wait()
            .for_element(Locator::Css("#cancel[disabled]"))
            .await
            .context("the cancel button to be disabled again")?;
        anyhow::Ok(())
    }
    .await;
    browser.close().await.ok();
    bed.daemon.stop().await?;
    driver.kill().await.ok();
    result
}
