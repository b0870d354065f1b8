// cellcloud's Node.js runtime: the Lambda Runtime API client loop, as AWS's Node runtimes run it.
//
// Plain CommonJS with Node's built-in modules only (no npm dependencies), so any Node 20+ on the
// host can run it: `node runtime.cjs <handler>` with AWS_LAMBDA_RUNTIME_API set. It loads the
// handler the way AWS's runtime interface client does (extensionless, .js, .mjs, .cjs, then a
// package name; ES modules through import()), patches console to write Lambda's
// `<ISO time>\t<request id>\t<LEVEL>\t<message>` lines, and speaks next/response/error/init
// error over one keep-alive HTTP connection.
//
// Two generations of AWS's semantics, chosen by the Node major (as AWS does per runtime):
//   nodejs20.x/22.x: handler(event, context, callback); a promise result answers at once, the
//     callback answers when the event loop is empty unless
//     context.callbackWaitsForEmptyEventLoop = false; a handler that neither returns a promise
//     nor calls back answers null once the event loop is empty; context.succeed/fail/done.
//   nodejs24.x: handler(event, context) only: a handler declaring a third (callback) parameter
//     is refused at init (Runtime.CallbackHandlerDeprecated); the awaited result answers.
"use strict";

const fs = require("node:fs");
const http = require("node:http");
const path = require("node:path");
const util = require("node:util");
const { pathToFileURL } = require("node:url");

const RUNTIME_PATH = "/2018-06-01/runtime";
const NODE_MAJOR = Number(process.versions.node.split(".")[0]);
const CALLBACK_HANDLERS = NODE_MAJOR < 24;
const CALLBACK_REMOVED_MESSAGE =
  "ERROR: AWS Lambda has removed support for callback-based function handlers starting with " +
  "Node.js 24. You need to modify this function to use a supported handler signature to use " +
  "Node.js 24 or later. For more information see " +
  "https://docs.aws.amazon.com/lambda/latest/dg/nodejs-handler.html.";

// -- errors, named as AWS's runtime names them -------------------------------------------------
function runtimeError(name) {
  const cls = class extends Error {};
  cls.prototype.name = `Runtime.${name}`;
  return cls;
}
const ImportModuleError = runtimeError("ImportModuleError");
const HandlerNotFound = runtimeError("HandlerNotFound");
const MalformedHandlerName = runtimeError("MalformedHandlerName");
const UserCodeSyntaxError = runtimeError("UserCodeSyntaxError");
const CallbackHandlerDeprecated = runtimeError("CallbackHandlerDeprecated");
const UnhandledPromiseRejection = runtimeError("UnhandledPromiseRejection");
const JSONStringifyError = runtimeError("JSONStringifyError");

function isError(e) {
  return util.types.isNativeError(e) || (e !== null && typeof e === "object" &&
    typeof e.name === "string" && typeof e.message === "string");
}

// The body of /invocation/{id}/error and /init/error: {errorType, errorMessage, trace}.
function toRapidResponse(error) {
  try {
    if (isError(error)) {
      return {
        errorType: String(error.name).replace(/\x7F/g, "%7F"),
        errorMessage: String(error.message).replace(/\x7F/g, "%7F"),
        trace: typeof error.stack === "string" ? error.stack.replace(/\x7F/g, "%7F").split("\n") : [],
      };
    }
    return { errorType: typeof error, errorMessage: String(error), trace: [] };
  } catch (_e) {
    return {
      errorType: "handled",
      errorMessage: "callback called with Error argument, but there was a problem while " +
        "retrieving one or more of its message, name, and stack",
      trace: [],
    };
  }
}

// How an error appears in the function's log: a tab, then JSON with the stack as an array.
function toFormatted(error) {
  try {
    return "\t" + JSON.stringify(error, (_k, v) => {
      if (!isError(v)) return v;
      const out = Object.assign({ errorType: v.name, errorMessage: v.message, code: v.code }, v);
      if (typeof v.stack === "string") out.stack = v.stack.split("\n");
      return out;
    });
  } catch (_e) {
    return "\t" + JSON.stringify(toRapidResponse(error));
  }
}

// -- logging: console.* become Lambda's tab-separated lines ------------------------------------
let currentRequestId; // undefined during init, as on AWS
function patchConsole() {
  const levels = [["trace", "TRACE"], ["debug", "DEBUG"], ["info", "INFO"], ["log", "INFO"],
    ["warn", "WARN"], ["error", "ERROR"], ["fatal", "FATAL"]];
  for (const [method, level] of levels) {
    console[method] = (message, ...params) => {
      const line = `${new Date().toISOString()}\t${currentRequestId}\t${level}\t` +
        util.format(message, ...params);
      // One record per line: embedded newlines become carriage returns, as AWS writes them.
      process.stdout.write(line.replace(/\n/g, "\r") + "\n");
    };
  }
}

// -- the Runtime API client --------------------------------------------------------------------
class RuntimeClient {
  constructor(address) {
    const colon = address.lastIndexOf(":");
    this.host = address.slice(0, colon);
    this.port = Number(address.slice(colon + 1));
    // One keep-alive connection; between calls its socket is unref'd by the agent, so an idle
    // connection never keeps the event loop alive (callbackWaitsForEmptyEventLoop relies on it).
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  request(method, urlPath, body, headers) {
    return new Promise((resolve, reject) => {
      const req = http.request({
        host: this.host, port: this.port, method, path: RUNTIME_PATH + urlPath,
        agent: this.agent, headers: Object.assign(
          body === undefined ? {} : { "Content-Type": "application/json",
            "Content-Length": Buffer.byteLength(body) }, headers || {}),
      }, (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers,
          body: Buffer.concat(chunks).toString("utf8") }));
        res.on("error", reject);
      });
      req.on("error", reject);
      req.end(body);
    });
  }

  async next() {
    const res = await this.request("GET", "/invocation/next");
    if (res.status !== 200) {
      throw new Error(`Runtime API next answered ${res.status}: ${res.body}`);
    }
    return res;
  }

  postResponse(id, result) {
    let body;
    try {
      body = JSON.stringify(result === undefined ? null : result);
    } catch (e) {
      return this.postError(id, new JSONStringifyError(`Unable to stringify response body: ${e}`));
    }
    return this.request("POST", `/invocation/${id}/response`, body);
  }

  postError(id, error) {
    const doc = toRapidResponse(error);
    return this.request("POST", `/invocation/${id}/error`, JSON.stringify(doc),
      { "Lambda-Runtime-Function-Error-Type": String(doc.errorType) });
  }

  postInitError(error) {
    const doc = toRapidResponse(error);
    return this.request("POST", "/init/error", JSON.stringify(doc),
      { "Lambda-Runtime-Function-Error-Type": String(doc.errorType) });
  }
}

// -- response streaming (awslambda.streamifyResponse) -----------------------------------------
// A streamified handler gets (event, responseStream, context); what it writes goes to the
// Runtime API as it is written (chunked, Lambda-Runtime-Function-Response-Mode: streaming);
// the invocation ends when the stream ends (never: the function's timeout ends it). A failure
// after the first write is reported in the trailers, as Lambda's runtimes do.
const STREAMING = Symbol.for("aws.lambda.runtime.handler.streaming");
const HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response";
globalThis.awslambda = {
  streamifyResponse(handler) {
    handler[STREAMING] = "response";
    return handler;
  },
  HttpResponseStream: {
    from(stream, prelude) {
      stream.setContentType(HTTP_INTEGRATION);
      stream.write(JSON.stringify(prelude || {}));
      stream.write(Buffer.alloc(8));
      return stream;
    },
  },
};

function responseStreamFor(id) {
  const { Writable } = require("stream");
  let contentType = "application/octet-stream";
  let req = null;
  let settle;
  const finished = new Promise((resolve) => { settle = resolve; });
  const open = () => {
    if (req) return req;
    req = http.request({
      host: client.host, port: client.port, method: "POST", agent: client.agent,
      path: `${RUNTIME_PATH}/invocation/${id}/response`,
      headers: { "Content-Type": contentType, "Transfer-Encoding": "chunked",
        "Lambda-Runtime-Function-Response-Mode": "streaming",
        "Trailer": "Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body" },
    }, (res) => { res.resume(); res.on("end", settle); res.on("error", settle); });
    req.on("error", settle);
    return req;
  };
  const stream = new Writable({
    write(chunk, _enc, cb) { open().write(chunk, cb); },
    final(cb) { open().end(); cb(); },
  });
  stream.setContentType = (t) => { contentType = String(t); };
  stream.opened = () => req !== null;
  stream.fail = (error) => {
    const doc = toRapidResponse(error);
    const r = open();
    r.addTrailers({ "Lambda-Runtime-Function-Error-Type": String(doc.errorType),
      "Lambda-Runtime-Function-Error-Body": Buffer.from(JSON.stringify(doc)).toString("base64") });
    r.end();
  };
  stream.finished = finished;
  return stream;
}

async function handleStreaming(handler, res, id) {
  const stream = responseStreamFor(id);
  try {
    await handler(JSON.parse(res.body || "null"), stream, buildContext(res, null));
  } catch (err) {
    logInvokeError(err);
    if (stream.opened()) stream.fail(err);
    else await client.postError(id, err);
    if (!stream.opened()) { scheduleNext(handler); return; }
  }
  await stream.finished;
  scheduleNext(handler);
}

// -- loading the handler -----------------------------------------------------------------------
function hasPackageJsonTypeModule(folder) {
  for (;;) {
    if (folder.endsWith("/node_modules")) return false;
    const pj = path.join(folder, "package.json");
    if (fs.existsSync(pj)) {
      try {
        return JSON.parse(fs.readFileSync(pj, "utf8")).type === "module";
      } catch (e) {
        console.warn(`${pj} cannot be read, it will be ignored for ES module detection purposes.`, e);
        return false;
      }
    }
    const parent = path.dirname(folder);
    if (parent === folder) return false;
    folder = parent;
  }
}

function tryRequire(file) {
  return fs.existsSync(file) ? require(file) : undefined;
}

async function tryImport(file) {
  return fs.existsSync(file) ? await import(pathToFileURL(file).href) : undefined;
}

async function loadModule(appRoot, moduleRoot, moduleName) {
  const base = path.resolve(appRoot, moduleRoot, moduleName);
  try {
    const bare = tryRequire(base); // an extensionless file (or a folder), as AWS loads it
    if (bare) return bare;
    const esm = hasPackageJsonTypeModule(path.dirname(base));
    if (!esm) {
      const cjs = tryRequire(base + ".js");
      if (cjs) return cjs;
    }
    const loaded = (esm && (await tryImport(base + ".js"))) || (await tryImport(base + ".mjs")) ||
      tryRequire(base + ".cjs");
    if (loaded) return loaded;
    // A package (node_modules, NODE_PATH): resolved from the task root, not from this file.
    return require(require.resolve(moduleName, { paths: [appRoot, path.join(appRoot, moduleRoot)] }));
  } catch (e) {
    if (e instanceof SyntaxError) {
      const err = new UserCodeSyntaxError(String(e));
      err.stack = e.stack;
      throw err;
    }
    if (e && e.code === "MODULE_NOT_FOUND") throw new ImportModuleError(String(e));
    throw e;
  }
}

async function loadHandler(appRoot, fullHandler) {
  if (fullHandler.includes("..")) {
    throw new MalformedHandlerName(`'${fullHandler}' is not a valid handler name. Use absolute ` +
      "paths when specifying root directories in handler names.");
  }
  const moduleAndHandler = path.basename(fullHandler);
  const moduleRoot = fullHandler.substring(0, fullHandler.indexOf(moduleAndHandler));
  const match = moduleAndHandler.match(/^([^.]*)\.(.*)$/);
  if (!match) throw new MalformedHandlerName("Bad handler");
  const app = await loadModule(appRoot, moduleRoot, match[1]);
  const fn = match[2].split(".").reduce((obj, key) => obj && obj[key], app);
  if (!fn) throw new HandlerNotFound(`${fullHandler} is undefined or not exported`);
  if (typeof fn !== "function") throw new HandlerNotFound(`${fullHandler} is not a function`);
  if (!CALLBACK_HANDLERS && fn.length >= 3) {
    throw new CallbackHandlerDeprecated(CALLBACK_REMOVED_MESSAGE);
  }
  return fn;
}

// -- the invocation loop -----------------------------------------------------------------------
const client = new RuntimeClient(process.env.AWS_LAMBDA_RUNTIME_API || "127.0.0.1:9001");
let beforeExit = () => {};
// During init a crash is an init error; during an invocation, that invocation's error.
let onFatal = (error, code) => {
  client.postInitError(error).finally(() => process.exit(code));
};

function buildContext(res, callbackContext) {
  const h = res.headers;
  const deadline = Number(h["lambda-runtime-deadline-ms"]);
  const parseHeader = (name) => (h[name] ? JSON.parse(h[name]) : undefined);
  const env = process.env;
  const context = callbackContext || {};
  Object.assign(context, {
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    clientContext: parseHeader("lambda-runtime-client-context"),
    identity: parseHeader("lambda-runtime-cognito-identity"),
    invokedFunctionArn: h["lambda-runtime-invoked-function-arn"],
    awsRequestId: h["lambda-runtime-aws-request-id"],
    getRemainingTimeInMillis: () => deadline - Date.now(),
  });
  if (h["lambda-runtime-aws-tenant-id"]) context.tenantId = h["lambda-runtime-aws-tenant-id"];
  if (!CALLBACK_HANDLERS) context.xRayTraceId = h["lambda-runtime-trace-id"];
  return context;
}

function logInvokeError(error) {
  console.error("Invoke Error", toFormatted(toRapidResponse(error)));
}

// nodejs20.x / 22.x: AWS's callback context (CallbackContext.js semantics).
function callbackContextFor(id, scheduleNext) {
  let done = false;
  let waitForEmptyEventLoop = true;
  const complete = (result) => {
    if (done) {
      console.error("Invocation has already been reported as done. Cannot call complete more " +
        "than once per invocation.");
      return;
    }
    done = true;
    client.postResponse(id, result).then(scheduleNext, crash);
  };
  const postError = (err) => {
    if (done) return;
    done = true;
    logInvokeError(err);
    client.postError(id, err).then(scheduleNext, crash);
  };
  const callback = (err, result) => {
    beforeExit = () => {};
    if (err !== undefined && err !== null) {
      postError(err);
    } else if (!waitForEmptyEventLoop) {
      complete(result);
    } else {
      beforeExit = () => {
        beforeExit = () => {};
        setImmediate(() => complete(result));
      };
    }
  };
  const finish = (err, result) => {
    beforeExit = () => {};
    if (err !== undefined && err !== null) postError(err);
    else complete(result);
  };
  const context = {
    get callbackWaitsForEmptyEventLoop() { return waitForEmptyEventLoop; },
    set callbackWaitsForEmptyEventLoop(v) { waitForEmptyEventLoop = v; },
    succeed: (result) => finish(null, result),
    fail: (err) => finish(err === undefined || err === null ? "handled" : err, null),
    done: finish,
  };
  // Neither a promise nor a callback: answer null once the event loop is empty.
  beforeExit = () => {
    beforeExit = () => {};
    if (done) return;
    done = true;
    client.postResponse(id, null).then(scheduleNext, crash);
  };
  return [callback, context];
}

function crash(error) {
  console.error(`Unexpected Top Level Error: ${error}`);
  process.exit(1);
}

function scheduleNext(handler) {
  setImmediate(() => handleOnce(handler).catch(crash));
}

async function handleOnce(handler) {
  const res = await client.next();
  const id = res.headers["lambda-runtime-aws-request-id"];
  currentRequestId = id;
  const trace = res.headers["lambda-runtime-trace-id"];
  if (trace) process.env._X_AMZN_TRACE_ID = trace;
  else delete process.env._X_AMZN_TRACE_ID;
  onFatal = (error, code) => {
    logInvokeError(error);
    client.postError(id, error).finally(() => process.exit(code));
  };
  if (handler[STREAMING]) {
    await handleStreaming(handler, res, id);
    return;
  }
  if (CALLBACK_HANDLERS) {
    const [callback, cbContext] = callbackContextFor(id, () => scheduleNext(handler));
    try {
      const context = buildContext(res, cbContext);
      const result = handler(JSON.parse(res.body || "null"), context, callback);
      if (result && typeof result.then === "function") {
        result.then(cbContext.succeed, cbContext.fail).catch(cbContext.fail);
      }
    } catch (err) {
      callback(err);
    }
    return;
  }
  let ok = true;
  let value;
  try {
    value = await handler(JSON.parse(res.body || "null"), buildContext(res, null));
  } catch (err) {
    ok = false;
    value = err;
  }
  await new Promise((resolve) => setImmediate(resolve));
  if (ok) {
    await client.postResponse(id, value);
  } else {
    logInvokeError(value);
    await client.postError(id, value);
  }
  scheduleNext(handler);
}

async function main() {
  patchConsole();
  process.on("uncaughtException", (error) => {
    console.error("Uncaught Exception", toFormatted(error));
    onFatal(error, 129);
  });
  process.on("unhandledRejection", (reason) => {
    const error = new UnhandledPromiseRejection(reason === undefined || reason === null
      ? String(reason) : reason.toString());
    error.reason = reason;
    console.error("Unhandled Promise Rejection", toFormatted(error));
    onFatal(error, 128);
  });
  process.on("beforeExit", () => beforeExit());
  const appRoot = process.env.LAMBDA_TASK_ROOT || "/var/task";
  const handlerName = process.argv[2] || process.env._HANDLER || "";
  let handler;
  try {
    handler = await loadHandler(appRoot, handlerName);
  } catch (error) {
    // Lambda's init error: logged, reported once, and this runtime process ends.
    console.error("Uncaught Exception", toFormatted(error));
    await client.postInitError(error).catch(() => {});
    process.exit(129);
  }
  scheduleNext(handler);
}

main();
