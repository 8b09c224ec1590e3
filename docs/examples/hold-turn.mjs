#!/usr/bin/env node
// One embedded-run-shaped turn (or several) on a session file, held through
// `fencelock hold`: no npm dependencies, Node 18 or newer.
//
//   node hold-turn.mjs SESSION [--lane L] [--message TEXT] [--turns N] [--model-ms MS]
//                      [--gate] [--writer NAME] [--fencelock PATH]
//                      [--no-wait | --timeout S]
//
// Each turn spawns `fencelock hold`, waits for its "held" line, appends the user's
// message, opens the prompt window, calls the model (simulated: it waits --model-ms,
// or with --gate until a line arrives on this program's stdin), closes the window,
// appends the reply and releases. The session stays held the whole time, so no other
// lane can write between the message and the reply.
//
// Lines on stdout, one per step: "hold pid=P", "held token=T", "prompt",
// "done turn=I", "moved session=FRESH" or "superseded session=FRESH" (below).
//
// A session a recover moved before this turn wrote anything to it (this lane was
// queued behind the stuck run, or started after the recover) refuses the turn's first
// append with SessionMovedError, nothing written: the turn follows the move, says
// "moved session=FRESH", and is done on FRESH, as is every later turn.
//
// Exit codes: 0 every turn done; 3 a takeover (something wrote to the session outside
// the protocol during the turn); 4 the session was held by another run (only with
// --no-wait or --timeout); 5 the turn was moved: a `fencelock recover` found it still
// holding the session past its wait and started FRESH, where the turn is re-fired, so
// its reply is not appended (it would answer the turn twice) but kept aside as below;
// 2 a usage error (an unknown option, no SESSION); 1 anything
// else (fencelock missing, hold ended early, a write error). Whenever the reply was ready but could not be appended, it is NOT in
// the session (unless the answer says "stored": true, and then only there), and rather
// than drop it silently this program says so on stderr and appends it, marked
// "undelivered" with the reason, to SESSION.undelivered. If hold itself ended
// before answering (killed, say), or answered "stored": null (a failed write it could
// not take back), the reply may or may not have gone in: it is kept all the same
// (marked "HoldEnded", or with the error), and the message says to check the session
// (unless hold ended before the reply's append was sent: then it is not in).

import { spawn } from "node:child_process";
import { appendFileSync } from "node:fs";
import { createInterface } from "node:readline";

class Superseded extends Error {
  // A recover moved the turn to the fresh session `session` (hold's "superseded").
  constructor(session) {
    super(`a recover moved this turn to ${session}, where it is re-fired`);
    this.session = session;
  }
}

class HoldError extends Error {
  // An {"ok": false, ...} answer: .answer.error is fencelock's exception class name.
  constructor(answer) {
    super(`${answer.error}: ${answer.message}`);
    this.answer = answer;
  }
}

class Hold {
  // A `fencelock hold` child and its line protocol: one JSON request per line in,
  // one JSON answer per line out, in order.
  constructor(fencelock, session, lane, extra) {
    this.child = spawn(fencelock, ["hold", session, "--lane", lane, ...extra], {
      stdio: ["pipe", "pipe", "inherit"],
      // A process group of its own: a Ctrl-C (or `kill -- -PGID`) meant for this
      // program does not stop hold in the middle of the turn; hold still ends with this
      // program, at end of its stdin.
      detached: true,
    });
    this.answers = [];
    this.waiting = [];
    this.ended = null;
    this.nextId = 1;
    this.exited = new Promise((resolve) =>
      this.child.on("exit", (code, signal) => resolve(code ?? `by ${signal}`)),
    );
    // A hold that died cannot be written to; its end of file is reported by next().
    this.child.stdin.on("error", () => {});
    this.child.on("error", (e) => this.end(new Error(`cannot run ${fencelock}: ${e.message}`)));
    const lines = createInterface({ input: this.child.stdout, crlfDelay: Infinity });
    lines.on("line", (line) => {
      let answer;
      try {
        answer = JSON.parse(line);
      } catch {
        // Half an answer, then end of file: hold was stopped as it wrote it.
        this.end(new Error("fencelock hold ended in the middle of an answer"));
        return;
      }
      const w = this.waiting.shift();
      if (w) w.resolve(answer);
      else this.answers.push(answer);
    });
    lines.on("close", () => this.end(new Error("fencelock hold ended without answering")));
  }

  end(error) {
    if (this.ended) return;
    this.ended = error;
    for (const w of this.waiting.splice(0)) w.reject(error);
  }

  next() {
    if (this.answers.length) return Promise.resolve(this.answers.shift());
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  async request(op, fields = {}) {
    const id = this.nextId++;
    this.child.stdin.write(JSON.stringify({ op, id, ...fields }) + "\n");
    const answer = await this.next();
    // An answer without an id is hold's to a line it could not read as a request (one
    // over its size bound): this request's, as answers come in order.
    if (answer.id !== id && answer.id !== undefined) {
      throw new Error(`answer ${answer.id} to request ${id}`);
    }
    if (!answer.ok) throw new HoldError(answer);
    return answer;
  }

  async release() {
    await this.request("release");
    this.child.stdin.end();
    return this.exited;
  }
}

function parseArgs(argv) {
  const opts = {
    lane: "node:example", message: "hello", turns: 1, modelMs: 50, gate: false,
    writer: `node-${process.pid}`, fencelock: "fencelock", holdArgs: [],
  };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--lane") opts.lane = value();
    else if (a === "--message") opts.message = value();
    else if (a === "--turns") opts.turns = Number(value());
    else if (a === "--model-ms") opts.modelMs = Number(value());
    else if (a === "--gate") opts.gate = true;
    else if (a === "--writer") opts.writer = value();
    else if (a === "--fencelock") opts.fencelock = value();
    else if (a === "--no-wait") opts.holdArgs.push("--no-wait");
    else if (a === "--timeout") opts.holdArgs.push("--timeout", value());
    else if (a.startsWith("--")) usage(`unknown option ${a}`);
    else rest.push(a);
  }
  if (rest.length !== 1) usage("give exactly one SESSION");
  opts.session = rest[0];
  return opts;
}

function usage(message) {
  process.stderr.write(
    `hold-turn: ${message}\n` +
      "usage: node hold-turn.mjs SESSION [--lane L] [--message TEXT] [--turns N] " +
      "[--model-ms MS] [--gate] [--writer NAME] [--fencelock PATH] [--no-wait | --timeout S]\n",
  );
  process.exit(2);
}

// The simulated model call: a timer, or with --gate one line on stdin per call.
let stdinLines = null;
function model(opts, message) {
  if (!opts.gate) {
    return new Promise((resolve) => setTimeout(() => resolve(`echo: ${message}`), opts.modelMs));
  }
  if (!stdinLines) {
    const rl = createInterface({ input: process.stdin });
    stdinLines = { queue: [], waiting: [] };
    rl.on("line", (l) => {
      const w = stdinLines.waiting.shift();
      if (w) w(l);
      else stdinLines.queue.push(l);
    });
  }
  if (stdinLines.queue.length) {
    stdinLines.queue.shift(); // a line that came early lets this call return at once
    return Promise.resolve(`echo: ${message}`);
  }
  return new Promise((resolve) => stdinLines.waiting.push(() => resolve(`echo: ${message}`)));
}

function keepUndelivered(opts, entry, error, sent) {
  // The reply is not in the session (or, when hold ended before it answered its append
  // or could not take a failed line back, perhaps not): keep it where a person or a
  // retry will find it. `sent`: whether its append had been asked for.
  const aside = `${opts.session}.undelivered`;
  const why = error instanceof HoldError ? error.answer.error
    : error instanceof Superseded ? "Superseded" : "HoldEnded";
  appendFileSync(aside, JSON.stringify({ ...entry, undelivered: why }) + "\n", {
    mode: 0o600,
  });
  const fate = error instanceof Superseded
    ? "the reply was not appended, as the re-fired turn answers it there"
    : !(error instanceof HoldError)
    ? sent
      ? "fencelock hold ended before it answered, so the reply may or may not be in the " +
        "session (check it before sending the kept copy again)"
      : "fencelock hold ended before the reply was sent to it, so it is not in the session"
    : error.answer.stored === null
    ? "the reply could not be taken back out after a failed write, so it may or may not " +
      "be in the session (check it before sending the kept copy again)"
    : "the reply was not appended";
  process.stderr.write(
    `hold-turn: ${opts.session}: ${error.message}\n` +
      `hold-turn: ${fate}; it is kept in ${aside}\n`,
  );
}

async function appendElsewhere(opts, session, entry) {
  // One append to `session` through a hold of its own (a turn's reply that goes to the
  // fresh session its message was carried to).
  const hold = new Hold(opts.fencelock, session, opts.lane, opts.holdArgs);
  const held = await hold.next();
  if (!held.ok) throw new HoldError(held);
  await hold.request("append", { entry });
  const code = await hold.release();
  if (code !== 0) throw new Error(`fencelock hold exited ${code}`);
}

async function turn(opts, n) {
  const hold = new Hold(opts.fencelock, opts.session, opts.lane, opts.holdArgs);
  if (hold.child.pid !== undefined) console.log(`hold pid=${hold.child.pid}`);
  const held = await hold.next();
  if (!held.ok) {
    // hold has said why on its own stderr (which this program shares) as it exits.
    const e = new HoldError(held);
    e.reported = true;
    throw e;
  }
  console.log(`held token=${held.record.token}`);
  const who = { writer: opts.writer, turn: n };
  try {
    await hold.request("append", { entry: { role: "user", content: opts.message, ...who } });
  } catch (e) {
    if (e instanceof HoldError && e.answer.error === "SessionMovedError" && !e.answer.stored) {
      // Moved before this turn wrote anything here: it goes on in the fresh session.
      await hold.release().catch(() => {});
      console.log(`moved session=${e.answer.moved_to}`);
      return { session: e.answer.moved_to, done: false };
    }
    throw e;
  }
  await hold.request("prompt_begin");
  console.log("prompt");
  const reply = { role: "assistant", content: await model(opts, opts.message), ...who };
  let sent = false;
  try {
    try {
      await hold.request("prompt_end"); // the fence: did anything else write meanwhile?
      // A long model call may have outlasted a stuck-session recovery: did it move on?
      const moved = (await hold.request("superseded")).session;
      if (moved !== null) throw new Superseded(moved);
      sent = true;
      await hold.request("append", { entry: reply });
    } catch (e) {
      // The recover's mark said at the fence (SessionMovedError): moved, as above; but
      // where this turn took the session after the stuck run's end and its message
      // went in before the move ("carried": the recover took it along), nobody
      // re-fires it: its reply goes to the fresh session, after its message.
      if (e instanceof HoldError && e.answer.error === "SessionMovedError" && !e.answer.stored) {
        if (e.answer.carried) {
          await hold.release().catch(() => {});
          sent = true;
          await appendElsewhere(opts, e.answer.moved_to, reply);
          console.log(`moved session=${e.answer.moved_to}`);
          console.log(`done turn=${n}`);
          return { session: e.answer.moved_to, done: true };
        }
        throw new Superseded(e.answer.moved_to);
      }
      throw e;
    }
  } catch (e) {
    // Whatever went wrong (a takeover, a refused request, hold gone), the reply is
    // never dropped in silence.
    if (e instanceof HoldError && e.answer.stored) {
      // The line went in before the failure was found: keeping it elsewhere too
      // would make it twice.
      process.stderr.write(
        `hold-turn: ${opts.session}: ${e.message}\n` +
          `hold-turn: the reply is in the session all the same\n`,
      );
    } else {
      keepUndelivered(opts, reply, e, sent);
    }
    e.reported = true;
    await hold.release().catch(() => {});
    if (e instanceof Superseded) console.log(`superseded session=${e.session}`);
    throw e;
  }
  const code = await hold.release();
  if (code !== 0) throw new Error(`fencelock hold exited ${code}`);
  console.log(`done turn=${n}`);
  return null;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  for (let n = 1; n <= opts.turns; n++) {
    // A turn the session's move refused is done again where the move points (a move
    // followed by another one is followed too; a recover never points back).
    for (let moves = 0; ; moves++) {
      const moved = await turn(opts, n);
      if (moved === null) break;
      opts.session = moved.session;
      if (moved.done) break; // (its reply went there: the turn is done)
      if (moves >= 16) throw new Error(`${opts.session}: moved again and again; giving up`);
    }
  }
  process.exit(0);
}

main().catch((e) => {
  const kind = e instanceof HoldError ? e.answer.error : null;
  if (!e.reported) process.stderr.write(`hold-turn: ${e.message}\n`);
  const takeover = ["SessionTakeoverError", "HolderLostError", "SessionMovedError"].includes(kind);
  process.exit(
    e instanceof Superseded ? 5 : kind === "SessionContendedError" ? 4 : takeover ? 3 : 1,
  );
});
