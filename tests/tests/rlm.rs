//! The Recursive Language Model loop (`Coordinator.Ask`, `coordinator ask`) with real processes:
//! a root model that writes code on cue (a scripted backend on one agent) and a sub-call model
//! (another scripted backend on another agent), the context in a session.

use kowalski_exo_common::proto::{
    AskFinished, AskFolded, AskRequest, AskSubcall, ClusterOpenSessionRequest, CountTokensRequest,
    OpenSessionRequest, SamplingOptions, ask_event::Event, node_agent_client::NodeAgentClient,
};
use kowalski_exo_tests::{InferenceCluster, LlamaServer, ScriptedBackend, Step, binary, outcome};
use nix::sys::signal::Signal;

/// What one run streamed: the blocks' outputs and statuses, the turns, and its end.
#[derive(Debug, Default)]
struct Run {
    blocks: Vec<(String, String)>,
    subcalls: Vec<AskSubcall>,
    folded: Vec<AskFolded>,
    turns: u32,
    text: String,
    finished: AskFinished,
}

async fn ask(cluster: &InferenceCluster, request: AskRequest) -> Run {
    let mut stream = cluster
        .client()
        .await
        .ask(request)
        .await
        .expect("Ask")
        .into_inner();
    let mut run = Run::default();
    while let Some(event) = stream.message().await.expect("the Ask stream") {
        match event.event {
            Some(Event::Block(b)) => run.blocks.push((b.status, b.output)),
            Some(Event::Turn(_)) => run.turns += 1,
            Some(Event::Subcall(c)) => run.subcalls.push(c),
            Some(Event::Folded(f)) => run.folded.push(f),
            Some(Event::Delta(d)) => run.text.push_str(&d.text),
            Some(Event::Finished(f)) => run.finished = f,
            _ => {}
        }
    }
    run
}

fn request(question: &str, context: &str) -> AskRequest {
    AskRequest {
        model: "root".into(),
        question: question.into(),
        context: context.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A cluster where agent-0 serves the root model and agent-1 the sub-call model.
async fn cluster() -> (InferenceCluster, ScriptedBackend, ScriptedBackend) {
    let root = ScriptedBackend::start(&["root"]);
    let sub = ScriptedBackend::start(&["sub"]);
    let cluster = InferenceCluster::start(&[&root.api_base(), &sub.api_base()], &[], 1);
    cluster.served_by("root", 1).await;
    cluster.served_by("sub", 1).await;
    (cluster, root, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_is_read_in_pieces_by_sub_calls_and_answered_from_a_variable() {
    let (cluster, root, _sub) = cluster().await;
    let context = "word ".repeat(10_000);
    root.push(Step::answer([
        "I will split it.\n```repl\nn = len(context)\nparts = llm_query_batched([context[i:i + 1000] for i in range(0, n, 1000)], model='sub')\nprint(type(context).__name__, n, len(parts), sorted(set(parts)))\n```\n",
    ]));
    root.push(Step::answer([
        "```repl\nsummary = f'{len(parts)} parts, all {parts[0]}'\n```\nFINAL_VAR(summary)\n",
    ]));
    let run = ask(&cluster, request("How many parts?", &context)).await;
    assert_eq!(run.finished.error, "", "{run:?}");
    assert_eq!(run.finished.answer, "50 parts, all OK");
    assert_eq!(run.finished.reason, "final_var");
    assert_eq!((run.finished.iterations, run.turns), (2, 2));
    assert_eq!(run.blocks[0], ("ok".into(), "str 50000 50 ['OK']\n".into()));
    assert_eq!(run.subcalls.len(), 50);
    assert!(
        run.subcalls
            .iter()
            .all(|c| c.node == "agent-1" && c.model == "sub" && c.turn == 1 && c.block == 1),
        "{:?}",
        run.subcalls[0]
    );
    assert_eq!(run.finished.subcalls, 50);
    assert!(run.text.contains("I will split it."));
    // The root model never saw the context whole: only a preview in its first turn.
    let sent = root.chats()[0]["messages"].to_string();
    assert!(sent.contains("50000 characters"), "{sent}");
    assert!(
        sent.len() < 10_000,
        "the prompt holds the context: {} bytes",
        sent.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rlm_query_starts_a_child_run_with_its_own_session_and_context() {
    let (cluster, root, _sub) = cluster().await;
    root.push(Step::answer([
        "```repl\nr = rlm_query('How many words?', context='one two three')\nprint('child said', r)\n```\n",
    ]));
    // The child's own turn: it sees its context, not the parent's.
    root.push(Step::answer([
        "```repl\nn = len(context.split())\n```\nFINAL_VAR(n)\n",
    ]));
    root.push(Step::answer(["FINAL(the child counted 3)"]));
    let run = ask(&cluster, request("q", "the parent's own context")).await;
    assert_eq!(run.finished.error, "", "{run:?}");
    assert_eq!(run.blocks[0], ("ok".into(), "child said 3\n".into()));
    assert_eq!(run.finished.answer, "the child counted 3");
    let child_prompt = root.chats().iter().find_map(|r| {
        let sent = r["messages"].to_string();
        sent.contains("How many words?").then_some(sent)
    });
    let child_prompt = child_prompt.expect("the child run asked the root model");
    assert!(child_prompt.contains("13 characters"), "{child_prompt}");

    // From bash and JavaScript blocks too; each child counts its own context's words.
    root.push(Step::answer([
        "```bash\necho \"bash child: $(rlm_query 'Count' 'one two three')\"\n```\n```js\nrlm_query('Count', 'x y').then((r) => console.log('js child:', r))\n```\n",
    ]));
    for _ in 0..2 {
        root.push(Step::answer([
            "```repl\nn = len(context.split())\n```\nFINAL_VAR(n)\n",
        ]));
    }
    root.push(Step::answer(["FINAL(done)"]));
    let run = ask(&cluster, request("q", "ctx")).await;
    assert_eq!(run.finished.answer, "done", "{run:?}");
    assert_eq!(run.blocks[0], ("ok".into(), "bash child: 3\n".into()));
    assert_eq!(run.blocks[1], ("ok".into(), "js child: 2\n".into()));
    assert_eq!(run.subcalls.iter().filter(|c| c.child).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_near_the_window_is_folded_and_its_history_kept() {
    let (cluster, root, _sub) = cluster().await;
    root.push(Step::answer([
        "```repl\nprint(' '.join(f'w{i}' for i in range(2000)))\n```\n",
    ]));
    root.push(Step::answer(["```repl\nprint('small')\n```\n"]));
    root.push(Step::answer([
        "SUMMARY: the first block printed 2000 words",
    ]));
    root.push(Step::answer([
        "```repl\nn = len(history)\n```\nFINAL_VAR(n)\n",
    ]));
    let run = ask(
        &cluster,
        AskRequest {
            context_window: 5000,
            ..request("q", "ctx")
        },
    )
    .await;
    assert_eq!(run.finished.error, "", "{run:?}");
    // Folded before the third turn (before the second only the last turn was there to keep).
    assert_eq!(run.folded.len(), 1, "{:?}", run.folded);
    let folded = &run.folded[0];
    assert_eq!((folded.turn, folded.messages_folded), (3, 2));
    assert!(folded.tokens_before > 4250, "{folded:?}");
    assert!(folded.tokens_after < 1500, "{folded:?}");
    // The scripted backend offers no tokenizer of its own, so a BPE counted.
    assert_eq!(folded.tokenizer, "cl100k");
    let refused = NodeAgentClient::connect(cluster.agent("agent-0").url())
        .await
        .unwrap()
        .count_tokens(CountTokensRequest {
            model: "root".into(),
            texts: vec!["hello".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    assert!(
        refused.message().contains("offers no tokenizer"),
        "{refused:?}"
    );
    // The whole conversation stays in the session: system, question, two turns and outputs.
    assert_eq!(run.finished.answer, "6");
    let last = root.chats().last().unwrap()["messages"].to_string();
    assert!(last.contains("SUMMARY: the first block printed"), "{last}");
    assert!(
        !last.contains("w1999"),
        "the folded output is gone from the conversation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_way_to_end_a_run_ends_it_with_its_reason() {
    let (cluster, root, _sub) = cluster().await;
    // FINAL on a line of its own, with nested parentheses over two lines.
    root.push(Step::answer(["Easy.\nFINAL(a (b (c)) d\nand more)\n"]));
    let run = ask(&cluster, request("q", "ctx")).await;
    assert_eq!(
        (run.finished.reason.as_str(), run.finished.answer.as_str()),
        ("final", "a (b (c)) d\nand more")
    );
    // The reference implementation's answer dict.
    root.push(Step::answer([
        "```repl\nanswer['content'] = 'from the dict'\nanswer['ready'] = True\n```\n",
    ]));
    let run = ask(&cluster, request("q", "ctx")).await;
    assert_eq!(
        (run.finished.reason.as_str(), run.finished.answer.as_str()),
        ("answer", "from the dict")
    );
    // Out of turns: one more call asks for the best answer.
    root.push(Step::answer(["Thinking, no code."]));
    root.push(Step::answer(["Still thinking."]));
    root.push(Step::answer(["FINAL(best guess)"]));
    let run = ask(
        &cluster,
        AskRequest {
            max_iterations: 2,
            ..request("q", "ctx")
        },
    )
    .await;
    assert_eq!(
        (
            run.finished.reason.as_str(),
            run.finished.answer.as_str(),
            run.turns
        ),
        ("max_iterations", "best guess", 3)
    );
    // The sub-call budget: prompts past it fail, and the run ends at the next turn.
    root.push(Step::answer([
        "```repl\nanswers = llm_query_batched(['a', 'b', 'c', 'd', 'e'], model='sub')\nprint(sum(a == 'OK' for a in answers))\nanswer['content'] = 'three of five'\n```\n",
    ]));
    let run = ask(
        &cluster,
        AskRequest {
            max_subcalls: 3,
            ..request("q", "ctx")
        },
    )
    .await;
    assert_eq!(run.blocks[0].1, "3\n");
    assert_eq!(
        (run.finished.reason.as_str(), run.finished.answer.as_str()),
        ("max_subcalls", "three of five")
    );
    assert_eq!((run.finished.subcalls, run.subcalls.len()), (3, 3));
    // Broken code again and again ends the run instead of looping.
    for _ in 0..3 {
        root.push(Step::answer([
            "```repl\nanswer['content'] = 'partial'\n1 / 0\n```\n",
        ]));
    }
    let run = ask(&cluster, request("q", "ctx")).await;
    assert_eq!(
        (run.finished.reason.as_str(), run.finished.answer.as_str()),
        ("failures", "partial")
    );
    assert!(
        run.blocks[0].1.contains("ZeroDivisionError"),
        "{:?}",
        run.blocks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_spend_what_is_left_of_their_parents_tokens_and_time() {
    let (cluster, root, _sub) = cluster().await;
    // One turn's prompt tokens (the scripted server counts words), to set budgets by.
    root.push(Step::answer(["FINAL(x)"]));
    let one_turn = ask(&cluster, request("q", "ctx"))
        .await
        .finished
        .prompt_tokens;
    assert!(one_turn > 100, "{one_turn}");

    // Tokens: the parent's first turn leaves room for a child's turn, not for what follows it.
    root.push(Step::answer(["```repl
r = rlm_query('Count', context='a b c')
print(r)
```
"]));
    root.push(Step::answer(["```repl
x = 1
```
"]));
    let run = ask(
        &cluster,
        AskRequest {
            max_tokens: one_turn * 3 / 2,
            ..request("q", "ctx")
        },
    )
    .await;
    assert_eq!(run.finished.reason, "max_tokens", "{run:?}");
    assert!(
        run.blocks[0]
            .1
            .contains("Error: the run's budget ran out (max_tokens) before the child answered"),
        "{:?}",
        run.blocks
    );
    // The child run shows in the parent's trajectory, with its turns and tokens.
    let [child] = run.subcalls.as_slice() else {
        panic!("{:?}", run.subcalls)
    };
    assert!(child.child && child.iterations == 1, "{child:?}");
    assert!(
        child.tokens > one_turn && !child.node.is_empty(),
        "{child:?}"
    );
    assert!(run.finished.subcall_tokens >= child.tokens, "{run:?}");

    // Time: one deadline for the tree. The parent's block spends 1 s before the child starts,
    // the child's first block 0.8 s; the child, on a clock of its own, would ask a second turn.
    root.push(Step::answer(["```repl
import time
time.sleep(1)
r = rlm_query('Wait', context='x')
print(r)
```
"]));
    root.push(Step::answer(["```repl
import time
time.sleep(0.8)
```
"]));
    root.push(Step::answer(["FINAL(the child's own clock)"]));
    let run = ask(
        &cluster,
        AskRequest {
            max_time_ms: 1500,
            ..request("q", "ctx")
        },
    )
    .await;
    assert_eq!(run.finished.reason, "max_time", "{run:?}");
    assert!(
        run.blocks[0].1.contains("budget ran out (max_time)"),
        "{:?}",
        run.blocks
    );
    let last = root.chats().last().unwrap()["messages"].to_string();
    assert!(
        !last.contains("time.sleep(0.8)"),
        "the child asked another turn past the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_asks_over_a_json_context_and_prints_the_answer() {
    let (cluster, root, _sub) = cluster().await;
    root.push(Step::answer([
        "```repl\ntotal = sum(item['n'] for item in context)\n```\nFINAL_VAR(total)\n",
    ]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("context.json");
    std::fs::write(&file, r#"[{"n": 1}, {"n": 2}, {"n": 39}]"#).unwrap();
    let (code, out, err) = outcome(
        std::process::Command::new(binary("coordinator"))
            .args([
                "ask",
                "--addr",
                &cluster.coordinator.url(),
                "--model",
                "root",
            ])
            .arg("--context")
            .arg(&file)
            .arg("--trajectory")
            .arg(dir.path().join("run.jsonl"))
            .args(["--context-json", "What is the total?"])
            .output()
            .unwrap(),
    );
    assert_eq!((code, out.as_str()), (Some(0), "42\n"), "{err}");
    assert!(err.contains("final_var"), "{err}");
    let (code, tree, err) = outcome(
        std::process::Command::new(binary("coordinator"))
            .arg("trajectory")
            .arg(dir.path().join("run.jsonl"))
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        tree.starts_with("ask: context of 3 in session ask-"),
        "{tree}"
    );
    assert!(tree.contains("├─ turn 1 on agent-0"), "{tree}");
    assert!(tree.contains("│  ├─ block 1 (python): ok"), "{tree}");
    assert!(
        tree.contains("└─ answer after 1 turns (final_var;"),
        "{tree}"
    );
    assert!(tree.ends_with("): 42\n"), "{tree}");
    // The dashboard keeps the run, rendered as the same tree.
    let state: serde_json::Value = reqwest::get(format!("{}/dashboard/state", cluster.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runs = state["trajectories"].as_array().unwrap();
    let kept = runs
        .iter()
        .find(|r| r["question"] == "What is the total?")
        .unwrap_or_else(|| panic!("{runs:?}"));
    assert_eq!(
        (&kept["model"], &kept["finished"]),
        (&"root".into(), &true.into())
    );
    assert_eq!(kept["tree"].as_str().unwrap(), tree);
    // Each node shows the models its backend serves.
    let served: Vec<(String, String)> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| {
            let models = n["models"].as_array().unwrap().clone();
            models.into_iter().map(|m| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    m["model"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        served,
        [
            ("agent-0".to_string(), "root".to_string()),
            ("agent-1".to_string(), "sub".to_string())
        ],
        "{state}"
    );
    let (code, _, err) = outcome(
        std::process::Command::new(binary("coordinator"))
            .args([
                "ask",
                "--addr",
                &cluster.coordinator.url(),
                "--model",
                "nope",
                "q",
            ])
            .output()
            .unwrap(),
    );
    // An unknown model is bad usage, as for `coordinator chat`.
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no node serves the model 'nope'"), "{err}");
    // A JSON value on the command line.
    root.push(Step::answer([
        "```repl\nkeys = ','.join(sorted(context))\n```\nFINAL_VAR(keys)\n",
    ]));
    let ask_with = |value: &str| {
        let addr = cluster.coordinator.url();
        let args = ["ask", "--addr", &addr, "--model", "root"];
        outcome(
            std::process::Command::new(binary("coordinator"))
                .args(args)
                .args(["--context-value", value, "Which keys?"])
                .output()
                .unwrap(),
        )
    };
    let (code, out, err) = ask_with(r#"{"b": 1, "a": [2]}"#);
    assert_eq!((code, out.as_str()), (Some(0), "a,b\n"), "{err}");
    let (code, _, err) = ask_with("{not json");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--context-value is not JSON"), "{err}");
}

/// The loop through the OpenAI SDK and the Ollama client, as the model `rlm:root`: the earlier
/// message is the context, the last the question; or a `context` field in the body.
const OPENAI_CLIENT: &str = r#"
import sys, openai, ollama
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
messages = [{"role": "user", "content": "alpha beta gamma"}, {"role": "user", "content": "How many words?"}]
whole = client.chat.completions.create(model="rlm:root", messages=messages)
text = whole.choices[0].message.content
assert text.endswith("Final answer:\n3"), text
assert "Counting." in text, text
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="rlm:root", messages=messages, stream=True) if c.choices)
assert streamed.endswith("Final answer:\n3"), streamed
listed = [m.id for m in client.models.list()]
assert listed == ["root", "sub", "rlm:root", "rlm:sub"], listed
# A context field in the body (JSON here) stands in for the earlier messages.
summed = client.chat.completions.create(model="rlm:root", messages=[{"role": "user", "content": "Sum?"}],
    extra_body={"context": {"items": [1, 2, 39]}})
assert summed.choices[0].message.content.endswith("Final answer:\n42"), summed
try:
    client.chat.completions.create(model="root", messages=messages, extra_body={"context": "x"})
    raise SystemExit("a context was taken by a model without the loop")
except openai.BadRequestError as e:
    assert "rlm:root" in str(e), e
local = ollama.Client(host=sys.argv[1])
assert "rlm:root" in [m.model for m in local.list().models]
said = local.chat(model="rlm:root", messages=messages, stream=False)
assert said.message.content.endswith("Final answer:\n3"), said
print("rlm ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_is_also_served_as_rlm_model_on_the_chat_apis() {
    let has_sdk = std::process::Command::new("python3")
        .args(["-c", "import openai, ollama"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        println!(
            "skipped: the openai and ollama Python packages are not installed (.ci/run installs them)"
        );
        return;
    }
    let (cluster, root, _sub) = cluster().await;
    let count = || {
        Step::answer(["Counting.\n```repl\nwords = len(context.split())\n```\nFINAL_VAR(words)\n"])
    };
    root.push(count());
    root.push(count());
    root.push(Step::answer([
        "```repl\nn = sum(context['items'])\n```\nFINAL_VAR(n)\n",
    ]));
    root.push(count());
    let (status, stdout, stderr) = outcome(
        std::process::Command::new("python3")
            .args(["-c", OPENAI_CLIENT, &cluster.http_url()])
            .output()
            .unwrap(),
    );
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "rlm ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_runs_end_to_end_against_a_real_llama_cpp_server() {
    // The system prompt alone is some 2,500 bytes, so tokens.
    let backend = match LlamaServer::start_with_window(8192) {
        Ok(backend) => backend,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let cluster = InferenceCluster::start(&[&backend.api_base], &[], 1);
    cluster.served_by(LlamaServer::MODEL, 1).await;
    // The tiny model's words are nonsense: the loop runs its turns and ends by its limit. Its
    // vocabulary is bytes, so by its own tokenizer the conversation (some 1,750 tokens at the
    // first turn, 140 more a turn) passes 85% of a 2,200-token window by the third turn, where
    // cl100k would count under 500 tokens and not fold.
    let run = ask(
        &cluster,
        AskRequest {
            model: LlamaServer::MODEL.into(),
            max_iterations: 3,
            context_window: 2200,
            options: Some(SamplingOptions {
                max_tokens: 16,
                ..Default::default()
            }),
            ..request("What is in the context?", "a small context")
        },
    )
    .await;
    assert_eq!(run.finished.error, "", "{run:?}");
    assert_eq!(run.finished.reason, "max_iterations", "{run:?}");
    assert_eq!(run.turns, 4);
    let folded = run.folded.first().expect("the conversation was folded");
    assert_eq!((folded.turn, folded.tokenizer.as_str()), (3, "model"));
    assert!(folded.tokens_before > 1870, "{folded:?}");
    assert!(run.finished.completion_tokens > 0, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_goes_on_with_the_same_answer_when_the_root_sessions_node_is_killed() {
    let root = ScriptedBackend::start(&["root"]);
    let subs: Vec<ScriptedBackend> = (0..2).map(|_| ScriptedBackend::start(&["sub"])).collect();
    let cluster = InferenceCluster::start(
        &[&root.api_base(), &subs[0].api_base(), &subs[1].api_base()],
        &[],
        1,
    );
    cluster.served_by("root", 1).await;
    cluster.served_by("sub", 2).await;
    let mut client = cluster.client().await;
    // Sessions go to the node holding the fewest: with one each on agent-0 and agent-1, the
    // run's own session goes to agent-2.
    for name in ["hold-0", "hold-1"] {
        client
            .open_session(ClusterOpenSessionRequest {
                session: Some(OpenSessionRequest {
                    session_id: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    root.push(Step::answer([
        "```repl\nparts = llm_query_batched([context[i:i + 4] for i in range(0, len(context), 4)], model='sub')\nprint(len(parts))\n```\n",
    ]));
    root.push(Step::answer([
        "```repl\nsummary = f'{len(parts)} parts: ' + ','.join(parts)\n```\nFINAL_VAR(summary)\n",
    ]));
    let mut stream = client
        .ask(request("q", "abcdefghijkl"))
        .await
        .unwrap()
        .into_inner();
    let (mut node, mut finished, mut killed) = (String::new(), None, false);
    let mut failovers = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(Event::Started(started)) => node = started.node,
            Some(Event::Failover(failover)) => failovers.push(failover),
            Some(Event::Block(block)) if !killed => {
                assert_eq!(block.output, "3\n");
                assert_eq!(node, "agent-2");
                cluster.agent(&node).signal(Signal::SIGKILL);
                killed = true;
            }
            Some(Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let finished = finished.unwrap();
    assert_eq!(finished.error, "", "{finished:?}");
    assert_eq!(
        (finished.reason.as_str(), finished.answer.as_str()),
        ("final_var", "3 parts: OK,OK,OK")
    );
    let asked: usize = subs.iter().map(|s| s.chats().len()).sum();
    assert_eq!(
        asked, 3,
        "the replay took the sub-calls' answers from the cache"
    );
    // The move is in the trajectory (at the check for an answer after the block that saw the
    // node die): the context's loading and the first block replayed.
    let [moved] = failovers.as_slice() else {
        panic!("{failovers:?}")
    };
    assert_eq!(
        (moved.turn, moved.what.as_str(), moved.from_node.as_str()),
        (1, "session", "agent-2")
    );
    assert!(moved.executions_replayed >= 2, "{moved:?}");
    assert!(!moved.to_node.is_empty() && moved.to_node != "agent-2");
}
